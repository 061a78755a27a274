"""`make demo`: a small offline analysis, printed to the terminal.

Runs on the embedded model when one is shipped, otherwise on a tiny random GPT-2 built from a
config (which shows the plumbing, not behaviour).
"""

import tl_backward as tlb
from tl_backward.core.adapter import get_adapter

if tlb.list_models():
    model, prompt, target = tlb.load_model(), "the capital of france is", " paris"
else:
    from tl_backward.zoo.tiny import tiny_model

    model, prompt, target = tiny_model("gpt2"), "the cat sat on the", " mat"

ad = get_adapter(model)
cache = tlb.capture(model, prompt, tlb.metrics.target_nll(target),
                    names=lambda n: n.endswith(("hook_resid_pre", "hook_attn_scores")))
print(f"model: {model.cfg.model_name}  prompt: {prompt!r}  target: {target!r}")
print(f"loss (target NLL) = {cache.metric.item():.4f}")
print("residual-gradient norm at the last position, per layer:")
for layer, g in enumerate(cache.resid_grads("pre")[:, 0, -1]):
    print(f"  layer {layer:2d}  |dL/d resid_pre| = {g.norm():.4e}")
ra = [cache.grad(ad.hook_name("attn_scores", l))[0] / ad.attn_scale(l) for l in range(ad.n_layers)]
norms = [(float(m[h].norm()), l, h) for l, m in enumerate(ra) for h in range(ad.n_heads)]
print("heads with the largest Reversed Attention norm:", ", ".join(f"L{l}H{h} {n:.2e}" for n, l, h in sorted(norms)[::-1][:5]))
