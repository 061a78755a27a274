"""Independent reference computations for tests: plain Hugging Face models, no TransformerLens.

``hf_activation_grads`` adds a zero tensor ε at a point inside a *fresh* HF model (same seed,
same weights as the bridge under test) and reads ∂loss/∂ε with ``torch.autograd.grad``. Because it
never touches TransformerLens hooks, it checks tl_backward's hook plumbing from the outside.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from tl_backward.zoo.tiny import tiny_hf_model

Loss = Callable[[Tensor], Tensor]  # logits [batch, pos, vocab] -> scalar


def last_token_nll(target: int, last: Tensor) -> Loss:
    """Σ_b −log p(target | row b) at each row's ``last`` position."""

    def loss(logits: Tensor) -> Tensor:
        rows = logits[torch.arange(len(last)), last]
        return -torch.log_softmax(rows.float(), -1)[:, target].sum()

    return loss


def _modules(hf, family: str, layer: int) -> dict:
    if family == "gpt2":
        blk = hf.transformer.h[layer]
        return dict(block=blk, ln1=blk.ln_1, attn=blk.attn, qkv=blk.attn.c_attn, o=blk.attn.c_proj,
                    ln2=blk.ln_2, mlp=blk.mlp, fc_in=blk.mlp.c_fc, fc_out=blk.mlp.c_proj)
    if family == "neox":
        blk = hf.gpt_neox.layers[layer]
        return dict(block=blk, ln1=blk.input_layernorm, attn=blk.attention, qkv=blk.attention.query_key_value,
                    o=blk.attention.dense, ln2=blk.post_attention_layernorm, mlp=blk.mlp,
                    fc_in=blk.mlp.dense_h_to_4h, fc_out=blk.mlp.dense_4h_to_h)
    blk = hf.model.layers[layer]
    return dict(block=blk, ln1=blk.input_layernorm, attn=blk.self_attn, q=blk.self_attn.q_proj,
                k=blk.self_attn.k_proj, v=blk.self_attn.v_proj, o=blk.self_attn.o_proj,
                ln2=blk.post_attention_layernorm, mlp=blk.mlp, fc_in=blk.mlp.gate_proj,
                up=blk.mlp.up_proj, fc_out=blk.mlp.down_proj)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out, new):
    return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new


def hf_activation_grads(family: str, seed: int, tokens: Tensor, loss_fn: Loss, layer: int,
                        n_heads: int, n_kv_heads: int | None = None, **overrides) -> dict[str, tuple[Tensor, Tensor]]:
    """Activation and ∂loss/∂activation at one layer of a fresh HF model, by ε-injection.

    Returns ``{kind: (activation, gradient)}`` for kinds resid_pre, resid_mid (sequential blocks),
    resid_post, attn_out, mlp_in, mlp_pre, mlp_pre_linear (gated), mlp_post, mlp_out, q, k, v, z,
    in TransformerLens shapes (``[batch, pos, head, d_head]`` for q/k/v/z).
    """
    extra = {"n_kv_heads": n_kv_heads} if n_kv_heads is not None and family in ("llama", "qwen2") else {}
    hf = tiny_hf_model(family, seed=seed, n_heads=n_heads, **extra, **overrides)
    for p in hf.parameters():
        p.requires_grad_(False)
    m = _modules(hf, family, layer)
    eps: dict[str, Tensor] = {}
    acts: dict[str, Tensor] = {}
    handles = []

    def out_hook(kind):
        def hook(module, args, out):
            x = _first(out)
            acts[kind] = x.detach().clone()
            eps[kind] = torch.zeros_like(x, requires_grad=True)
            return _replace_first(out, x + eps[kind])
        return hook

    def in_hook(kind):
        def hook(module, args, kwargs):
            if args:
                x = args[0]
                acts[kind] = x.detach().clone()
                eps[kind] = torch.zeros_like(x, requires_grad=True)
                return (x + eps[kind],) + tuple(args[1:]), kwargs
            x = kwargs["hidden_states"]
            acts[kind] = x.detach().clone()
            eps[kind] = torch.zeros_like(x, requires_grad=True)
            return args, {**kwargs, "hidden_states": x + eps[kind]}
        return hook

    handles.append(m["block"].register_forward_pre_hook(in_hook("resid_pre"), with_kwargs=True))
    handles.append(m["block"].register_forward_hook(out_hook("resid_post")))
    handles.append(m["attn"].register_forward_hook(out_hook("attn_out")))
    handles.append(m["ln2"].register_forward_hook(out_hook("mlp_in")))
    handles.append(m["fc_in"].register_forward_hook(out_hook("mlp_pre")))
    handles.append(m["fc_out"].register_forward_pre_hook(in_hook("mlp_post"), with_kwargs=True))
    handles.append(m["mlp"].register_forward_hook(out_hook("mlp_out")))
    handles.append(m["o"].register_forward_pre_hook(in_hook("z"), with_kwargs=True))
    if "up" in m:
        handles.append(m["up"].register_forward_hook(out_hook("mlp_pre_linear")))
    if family in ("llama", "qwen2"):
        for kind in "qkv":
            handles.append(m[kind].register_forward_hook(out_hook(kind)))
    else:
        handles.append(m["qkv"].register_forward_hook(out_hook("qkv")))
    try:
        with torch.enable_grad():
            logits = hf(tokens).logits
            loss = loss_fn(logits)
            keys = list(eps)
            grads = dict(zip(keys, torch.autograd.grad(loss, [eps[k] for k in keys])))
    finally:
        for h in handles:
            h.remove()

    b, p = tokens.shape
    out = {k: (acts[k], grads[k]) for k in keys if k not in ("qkv", "q", "k", "v", "z")}
    d_model = acts["resid_pre"].shape[-1]
    d_head = d_model // n_heads
    kv = n_kv_heads or n_heads
    out["z"] = tuple(t.reshape(b, p, n_heads, d_head) for t in (acts["z"], grads["z"]))
    if family == "gpt2":
        for i, kind in enumerate("qkv"):
            out[kind] = tuple(t.split(d_model, -1)[i].reshape(b, p, n_heads, d_head) for t in (acts["qkv"], grads["qkv"]))
    elif family == "neox":
        for i, kind in enumerate("qkv"):
            out[kind] = tuple(t.reshape(b, p, n_heads, 3, d_head)[..., i, :] for t in (acts["qkv"], grads["qkv"]))
    else:
        for kind in "qkv":
            heads = n_heads if kind == "q" else kv
            out[kind] = tuple(t.reshape(b, p, heads, d_head) for t in (acts[kind], grads[kind]))
    if family != "neox":
        # resid_mid = resid_pre + attn_out, so ε on attn_out perturbs resid_mid itself.
        out["resid_mid"] = (out["resid_pre"][0] + out["attn_out"][0], out["attn_out"][1])
    return out


def _permanent_ids(hp) -> set[int]:
    """Ids of the torch hooks behind the TransformerLens hooks on ``hp`` marked ``is_permanent``.

    TransformerLens installs permanent hooks itself while booting some bridges (component_setup.py
    ``_wire_symbolic_hooks``: OPT's fc1/fc2 MLP re-fires ``mlp.in.hook_in`` / ``mlp.out.hook_out``
    through ``mlp.hook_in`` / ``mlp.hook_out``); they survive ``reset_hooks`` by design. tl_backward
    never adds a permanent hook (tests/core/test_no_hooks.py checks its source), so these are TL's.
    """
    return {lh.hook.id for lh in hp.fwd_hooks + hp.bwd_hooks if getattr(lh, "is_permanent", False)}


def assert_no_hooks(model) -> None:
    """No TransformerLens or raw PyTorch hook is left on any hook point of ``model``, apart from the
    permanent hooks TransformerLens wires at boot (:func:`_permanent_ids`)."""
    for name, hp in model.hook_dict.items():
        tl_own = _permanent_ids(hp)
        left = [lh for lh in hp.fwd_hooks + hp.bwd_hooks if lh.hook.id not in tl_own]
        assert not left, f"TL hook left on {name}"
        assert not set(hp._forward_hooks) - tl_own and not set(hp._backward_hooks) - tl_own, \
            f"torch hook left on {name}"
        assert not hp._forward_pre_hooks, f"torch pre-hook left on {name}"


def assert_untouched(model) -> None:
    """No parameter holds a ``.grad``, and every parameter still requires grad as booted."""
    for name, p in model.named_parameters():
        assert p.grad is None, f"{name}.grad was written"
