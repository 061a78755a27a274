"""The HookedTransformer backend (tl_backward/core/hooked.py) against autograd on the model's own
activations and parameters, on tiny random ``HookedTransformerConfig`` models: GPT-2-like LN,
Llama-like RMS + rotary + GQA + gated MLP, NeoX-like parallel blocks with partial rotary, soft-capped
scores and logits with ``scale_attn_by_inverse_layer_idx`` and LNPre, ALiBi without normalisation,
attention-only; and a HookedTransformer converted from an HF GPT-2 (TransformerLens's
``convert_gpt2_weights``) against plain-HF autograd.

The reference runs the model itself (no tl_backward code): forward hooks keep each hook point's
output, ``torch.autograd.grad`` differentiates the last-position NLL with respect to those tensors
and to the parameters. Skipped on TransformerLens 4.x, which has no HookedTransformer.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import tl_backward as tlb
from tests.attention.test_reversed import hf_reference
from tests.conftest import SPECS
from tests.reference import assert_no_hooks, assert_untouched
from tests.tolerance import MODEL_TERMS, assert_close_fp32
from tl_backward.core.adapter import get_adapter
from tl_backward.core.compat import TL_VERSION, HookedTransformer, HookedTransformerConfig
from tl_backward.core.hooked import HookedAdapter
from tl_backward.lens.factors import MODULES
from tl_backward.zoo.tiny import tiny_hf_model

pytestmark = pytest.mark.skipif(
    HookedTransformer is None,
    reason=f"TransformerLens {TL_VERSION} has no HookedTransformer (removed in 4.0); these tests run in a "
           "TransformerLens 3.9 venv")


BASE = dict(n_layers=2, d_model=16, n_ctx=12, d_head=4, n_heads=4, d_mlp=32, d_vocab=30, seed=0)
CONFIGS = {
    "gpt2_ln": dict(act_fn="gelu_new", normalization_type="LN"),
    "llama_gqa_rotary_gated": dict(act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
                                   rotary_dim=4, gated_mlp=True, n_key_value_heads=2),
    "neox_parallel_partial_rotary": dict(act_fn="gelu", normalization_type="LN", positional_embedding_type="rotary",
                                         rotary_dim=2, parallel_attn_mlp=True),
    "softcap_inverse_scale_lnpre": dict(act_fn="gelu", normalization_type="LNPre", attn_scores_soft_cap=2.0,
                                        output_logits_soft_cap=3.0, scale_attn_by_inverse_layer_idx=True),
    "alibi_no_norm": dict(act_fn="relu", normalization_type=None, positional_embedding_type="alibi"),
    "attn_only": dict(act_fn="gelu", normalization_type="LN", attn_only=True),
}
TARGET = 5
# Whole forward + backward values of a d_model-16 model accumulate fewer terms than the bridge fixtures'
# MODEL_TERMS (tests/tolerance.py), so that bound holds with margin.
TERMS = MODEL_TERMS


def hooked(name: str | None, **extra) -> "HookedTransformer":
    """A tiny random HookedTransformer of ``CONFIGS[name]`` (BASE alone for None) updated by ``extra``;
    every parameter is perturbed so LN gains/biases and zero-initialised biases are generic (w = 1, b = 0
    would hide a missing gain or bias)."""
    cfg = {**BASE, **(CONFIGS[name] if name is not None else {}), **extra}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TransformerLens 3.9's HookedTransformer deprecation warning
        model = HookedTransformer(HookedTransformerConfig(**cfg)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def tokens() -> torch.Tensor:
    return torch.randint(0, BASE["d_vocab"], (2, 7), generator=torch.Generator().manual_seed(2))


def reference(model, toks: torch.Tensor, names=None):
    """(activations, gradients w.r.t. them, gradients w.r.t. named parameters, loss): the NLL of TARGET at the
    last position, summed over rows, differentiated by plain autograd through the model's own forward."""
    calls: dict[str, list[torch.Tensor]] = {}

    def keep(tensor, hook):  # ln1's hooks fire three times (q, k, v inputs): keep every call
        calls.setdefault(hook.name, []).append(tensor)

    chosen = (lambda n: True) if names is None else names if callable(names) else (lambda n: n in names)
    with torch.enable_grad():
        logits = model.run_with_hooks(toks, return_type="logits", fwd_hooks=[(chosen, keep)])
        loss = -torch.log_softmax(logits[:, -1].float(), -1)[:, TARGET].sum()
        keys = [(k, i) for k, ts in calls.items() for i, t in enumerate(ts) if t.requires_grad]
        params = dict(model.named_parameters())
        grads = torch.autograd.grad(loss, [calls[k][i] for k, i in keys] + list(params.values()), allow_unused=True)
    act_grads: dict[str, torch.Tensor] = {}
    for (k, _), g in zip(keys, grads):
        if g is not None:  # the gradient at a hook point is the sum over its calls
            act_grads[k] = act_grads[k] + g if k in act_grads else g
    for ts in calls.values():
        assert all(torch.equal(t, ts[0]) for t in ts)
    param_grads = {k: g for k, g in zip(params, grads[len(keys):])}
    return {k: ts[0].detach() for k, ts in calls.items()}, act_grads, param_grads, loss.detach()


@pytest.mark.parametrize("name", CONFIGS)
def test_capture_every_hook_point(name):
    model = hooked(name)
    assert isinstance(get_adapter(model), HookedAdapter)
    toks = tokens()
    cache = tlb.capture(model, toks, tlb.metrics.target_nll(TARGET))
    acts, grads, _, loss = reference(model, toks)
    assert_close_fp32(cache.metric, loss, n_terms=TERMS, what="metric")
    assert len(cache) > 10
    for key in cache:
        assert_close_fp32(cache[key], acts[key], n_terms=TERMS, what=key)
        if key in grads:
            assert_close_fp32(cache.grad(key), grads[key], n_terms=TERMS, what=f"{key} grad")
    # hook_resid_mid is a real hook on resid_pre + attn_out: its gradient is the full residual one.
    if "blocks.0.hook_resid_mid" in cache:
        assert_close_fp32(cache.grad("resid_mid", 0), grads["blocks.0.hook_resid_mid"], n_terms=TERMS)
    assert_no_hooks(model)
    assert_untouched(model)


@pytest.mark.parametrize("name", CONFIGS)
def test_reversed_attention_is_the_score_gradient(name):
    """RA·K = ∂L/∂q (rotated q and k on rotary models), an identity independent of scale, soft-cap and mask;
    RA is exactly 0 above the diagonal (the causal mask sits before hook_attn_scores) and patterns are the
    model's."""
    model = hooked(name)
    ad = get_adapter(model)
    toks = tokens()
    ra = tlb.reversed_attention(model, toks, TARGET)
    q_kind, k_kind = ("rot_q", "rot_k") if ad.rotary else ("q", "k")
    names = [ad.hook_name(k, l) for l in range(ad.n_layers) for k in (q_kind, k_kind, "pattern")]
    acts, grads, _, loss = reference(model, toks, lambda n: n in names)
    assert_close_fp32(ra.metric, loss, n_terms=TERMS)
    above = torch.ones(7, 7, dtype=torch.bool).triu(1)
    for l in range(ad.n_layers):
        k = acts[ad.hook_name(k_kind, l)].repeat_interleave(ad.n_heads // ad.n_kv_heads, dim=2)
        dq = torch.einsum("bhqk,bkhd->bqhd", ra.maps[l], k)
        expected = grads[ad.hook_name(q_kind, l)]
        assert float(expected.abs().max()) > 1e-6
        assert_close_fp32(dq, expected, n_terms=TERMS, what=f"RA·K at layer {l}")
        assert_close_fp32(ra.patterns[l], acts[ad.hook_name("pattern", l)], n_terms=TERMS)
        assert torch.isfinite(ra.maps[l]).all()
        assert (ra.maps[l][..., above] == 0).all()
    assert_no_hooks(model)
    assert_untouched(model)


def test_attention_scale_and_softcap_read_from_the_module():
    model = hooked("softcap_inverse_scale_lnpre")
    ad = get_adapter(model)
    assert [ad.attn_scale(l) for l in range(2)] == [2.0, 4.0]  # √d_head · (layer + 1)
    assert ad.routes[0].softcap == 2.0
    v = torch.randn(3, BASE["d_model"])
    logits = model.unembed(model.ln_final(v[:, None]))[:, 0]
    assert_close_fp32(ad.unembed(v), 3.0 * torch.tanh(logits / 3.0), n_terms=BASE["d_model"])


@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "attn_only"] + ["attn_only"])
def test_factors_are_the_parameter_gradients(name):
    """gf[l, m].reconstruct() = ∂L/∂(the parameter the model holds): W_Q, _W_K/_W_V under GQA, W_O,
    W_in, W_gate, W_out; x of W_Q/W_in is ln·w + b, derived from hook_normalized."""
    model = hooked(name)
    ad = get_adapter(model)
    toks = tokens()
    # modules="all": the modules the model has (attention-only: no MLP; gated: mlp_gate too)
    gf = tlb.gradient_factors(model, toks, TARGET, modules="all")
    mlp = () if name == "attn_only" else ("mlp_in", "mlp_gate", "mlp_out") if ad.gated_mlp else ("mlp_in", "mlp_out")
    assert gf.modules == (*mlp, "q", "k", "v", "o")
    _, _, pgrads, _ = reference(model, toks, lambda n: False)
    gqa = ad.n_kv_heads != ad.n_heads
    checked = 0
    for (l, m), factor in gf.factors.items():
        sub = "attn" if m in ("q", "k", "v", "o") else "mlp"
        weight = MODULES[m]
        param = f"blocks.{l}.{sub}.{'_' + weight if gqa and m in ('k', 'v') else weight}"
        assert_close_fp32(factor.reconstruct(), pgrads[param], n_terms=TERMS, what=f"{param}")
        checked += 1
    assert checked == ad.n_layers * len(gf.modules)
    assert_no_hooks(model)
    assert_untouched(model)


def test_factors_of_processed_weights():
    """After process_weights_ (fold_ln, center_writing_weights, center_unembed) the model holds other
    parameters (LNPre, gains folded into W_Q/W_in): the factors are the gradients of those."""
    model = hooked("gpt2_ln")
    get_adapter(model)  # an adapter made before processing must follow the swapped LN modules
    model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    assert model.cfg.normalization_type == "LNPre"
    toks = tokens()
    if model.hook_dict["blocks.0.ln1.hook_normalized"] is not model.blocks[0].ln1.hook_normalized:
        # TransformerLens 2.x: process_weights_ leaves hook_dict naming the discarded LN modules' hooks.
        with pytest.raises(tlb.errors.TLBackwardError, match=r"call model.setup\(\)") as err:
            tlb.gradient_factors(model, toks, TARGET, modules=["q"])
        assert err.value.argument == "model"
        assert_no_hooks(model)
        model.setup()
    gf = tlb.gradient_factors(model, toks, TARGET, modules=["q", "mlp_in", "mlp_out"])
    _, _, pgrads, _ = reference(model, toks, lambda n: False)
    for (l, m), factor in gf.factors.items():
        param = f"blocks.{l}.{'attn' if m == 'q' else 'mlp'}.{MODULES[m]}"
        assert_close_fp32(factor.reconstruct(), pgrads[param], n_terms=TERMS, what=param)


def test_patch_attention_and_zero_heads_edit_the_pattern_and_z():
    model = hooked("llama_gqa_rotary_gated")
    toks = tokens()
    ra = tlb.reversed_attention(model, toks, TARGET)
    eta = 0.5

    def add(l):
        def hook(pattern, hook):
            return pattern + eta * ra.maps[l]
        return hook
    expected = model.run_with_hooks(toks, fwd_hooks=[(f"blocks.{l}.attn.hook_pattern", add(l)) for l in range(2)])
    with tlb.patch_attention(model, ra, eta=eta):
        patched = model(toks)
    assert torch.equal(patched, expected)

    def zero(z, hook):
        z = z.clone()
        z[:, :, 1] = 0
        return z
    expected = model.run_with_hooks(toks, fwd_hooks=[("blocks.0.attn.hook_z", zero)])
    with tlb.zero_heads(model, [(0, 1)]):
        ablated = model(toks)
    assert torch.equal(ablated, expected)
    assert_no_hooks(model)


@pytest.mark.parametrize("name", ["gpt2_ln", "softcap_inverse_scale_lnpre"])
def test_backward_lens_reads_the_models_own_readout(name):
    """The lens projects δ of W_out through the model's own readout: ``model.unembed(model.ln_final(δ))``
    then ``c·tanh(·/c)`` under ``output_logits_soft_cap`` (HookedTransformer.forward), read from the bottom."""
    model = hooked(name)
    toks = tokens()
    lens = tlb.backward_lens(model, toks, TARGET, modules=["mlp_out"], top_k=3)
    readout = lens["mlp_out"]
    cap = model.cfg.output_logits_soft_cap
    for i, l in enumerate(readout.layers):
        delta = lens.factors[l, "mlp_out"].delta
        with torch.no_grad():
            logits = model.unembed(model.ln_final(delta[None]))[0]
        if cap > 0:
            logits = cap * torch.tanh(logits / cap)
        bottom = logits.topk(3, dim=-1, largest=False)
        assert torch.equal(readout.bottom_ids[i], bottom.indices)
        assert_close_fp32(readout.bottom_logits[i], bottom.values, n_terms=BASE["d_model"] * 2)


def norm_reference(model, toks):
    """{(layer, ln): (input, output, ∂L/∂input along the norm's branch, ∂L/∂output)} by plain autograd: a
    forward pre-hook hands each norm call a clone of its input (a node whose gradient is that call's branch
    only), a forward hook keeps its output; ln1's three calls (q, k, v inputs) are summed."""
    calls: dict[tuple[int, str], list[list[torch.Tensor]]] = {}
    handles = []
    for l, block in enumerate(model.blocks):
        for ln in ("ln1", "ln2"):
            if hasattr(block, ln):
                def pre(module, args, key=(l, ln)):
                    calls.setdefault(key, []).append([args[0].clone()])
                    return (calls[key][-1][0],)

                def post(module, args, out, key=(l, ln)):
                    calls[key][-1].append(out)
                handles += [getattr(block, ln).register_forward_pre_hook(pre),
                            getattr(block, ln).register_forward_hook(post)]
    try:
        with torch.enable_grad():
            logits = model(toks, return_type="logits")
            loss = -torch.log_softmax(logits[:, -1].float(), -1)[:, TARGET].sum()
            flat = [t for pairs in calls.values() for pair in pairs for t in pair]
            grads = iter(torch.autograd.grad(loss, flat, allow_unused=True))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for key, pairs in calls.items():
        g = [[next(grads) for _ in pair] for pair in pairs]
        total = [sum(x[i] if x[i] is not None else 0 for x in g) for i in (0, 1)]
        out[key] = (pairs[0][0].detach(), pairs[0][1].detach(), total[0], total[1])
    return out


@pytest.mark.parametrize("name", CONFIGS)
def test_derived_norm_points_carry_their_gradients(name):
    """ln1/ln2 ``hook_out`` (the sublayer input) and ``hook_in`` (the residual it normalises) are derived points:
    values and gradients equal plain autograd at the norm modules (``hook_in``: the norm's branch only). On
    sequential blocks the branch gradients are also the residual differences g(resid_pre) − g(resid_mid) and
    g(resid_mid) − g(resid_post)."""
    model = hooked(name)
    ad = get_adapter(model)
    toks = tokens()
    lns = ("ln1",) if model.cfg.attn_only else ("ln1", "ln2")
    names = [f"blocks.{l}.{ln}.hook_{io}" for l in range(ad.n_layers) for ln in lns for io in ("in", "out")]
    assert not set(names) & ad.values_only_hooks
    cache = tlb.capture(model, toks, tlb.metrics.target_nll(TARGET), names=names)
    ref = norm_reference(model, toks)
    _, grads, _, _ = reference(model, toks, lambda n: "resid" in n)
    for l in range(ad.n_layers):
        for ln in lns:
            x, y, gx, gy = ref[(l, ln)]
            for io, value, grad in (("in", x, gx), ("out", y, gy)):
                key = f"blocks.{l}.{ln}.hook_{io}"
                assert_close_fp32(cache[key], value, n_terms=TERMS, what=key)
                assert float(grad.abs().max()) > 0
                assert_close_fp32(cache.grad(key), grad, n_terms=TERMS, what=f"{key} grad")
        if not ad.parallel_blocks and not model.cfg.attn_only:
            g = lambda kind: grads[f"blocks.{l}.hook_{kind}"]  # noqa: E731
            size = float(g("resid_pre").abs().max())  # a difference is rounded at the size of its terms
            assert_close_fp32(cache.grad(f"blocks.{l}.ln1.hook_in"), g("resid_pre") - g("resid_mid"),
                              n_terms=TERMS, scale=size)
            assert_close_fp32(cache.grad(f"blocks.{l}.ln2.hook_in"), g("resid_mid") - g("resid_post"),
                              n_terms=TERMS, scale=size)
    assert_no_hooks(model)
    assert_untouched(model)


def test_derived_points_and_refusals_name_the_fix():
    model = hooked("gpt2_ln")
    ad = get_adapter(model)
    assert ad.hook_name("attn_in", 0) == "blocks.0.ln1.hook_out"
    cache = tlb.capture(model, tokens(), tlb.metrics.target_nll(TARGET), names=["blocks.0.ln1.hook_out"])
    ln1 = model.blocks[0].ln1
    # Independent of where a TransformerLens version fires hook_normalized (2.x: after the gain and bias):
    # ln1's output is the LayerNorm of the residual, with its own gain and bias.
    resid = reference(model, tokens(), ["blocks.0.hook_resid_pre"])[0]["blocks.0.hook_resid_pre"]
    expected = torch.nn.functional.layer_norm(resid, (BASE["d_model"],), ln1.w, ln1.b, eps=model.cfg.eps)
    assert_close_fp32(cache["blocks.0.ln1.hook_out"], expected, n_terms=BASE["d_model"])
    assert list(cache) == ["blocks.0.ln1.hook_out"]  # the hooks its gradient is computed from stay internal
    with pytest.raises(tlb.errors.TLBackwardError, match="hook_cos"):
        ad.hook_name("cos", 0)
    with pytest.raises(tlb.errors.TLBackwardError, match="mlp_gate"):
        ad.linear(0, "mlp_gate")
    attn_only = get_adapter(hooked("attn_only"))
    with pytest.raises(tlb.errors.TLBackwardError, match="no dense MLP"):
        attn_only.linear(0, "mlp_in")
    shortformer = get_adapter(hooked("gpt2_ln", positional_embedding_type="shortformer"))
    with pytest.raises(tlb.errors.TLBackwardError, match="shortformer"):
        shortformer.linear(0, "q")
    with pytest.raises(tlb.errors.TLBackwardError, match="read weights through the adapter"):
        ad.linear(0, "mlp_out").original_component


def hooked_from_hf(hf) -> "HookedTransformer":
    """The tiny HF GPT-2 converted with TransformerLens's own ``convert_gpt2_weights`` into a HookedTransformer
    without weight processing (its config written here from the HF config: TransformerLens 3.9's
    ``convert_hf_model_config`` reads ``GPT2Config.n_ctx``, which transformers 5 no longer has)."""
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    c = hf.config
    cfg = HookedTransformerConfig(n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
                                  d_mlp=c.n_inner, n_ctx=c.n_positions, d_vocab=c.vocab_size, act_fn="gelu_new",
                                  normalization_type="LN", eps=c.layer_norm_epsilon,
                                  original_architecture="GPT2LMHeadModel")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg)
    model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    return model.eval()


def test_converted_gpt2_matches_hf_autograd():
    """RA and the W_in / W_out factors of a HookedTransformer converted from an HF GPT-2 equal plain-HF autograd
    (∂L/∂P of the eager attention probabilities → softmax backward ÷ √d_head; ∂L/∂c_fc.weight, ∂L/∂c_proj.weight,
    both Conv1D [in, out] = TransformerLens's layout)."""
    hf = tiny_hf_model("gpt2", **SPECS["gpt2"])
    model = hooked_from_hf(copy.deepcopy(hf))
    ids = torch.tensor([[1, 7, 12, 5, 33, 9, 20]])
    target = 11
    ra = tlb.reversed_attention(model, ids, target)
    ref, patterns, loss = hf_reference("gpt2", SPECS["gpt2"], ids, torch.tensor([ids.shape[1] - 1]),
                                       torch.tensor([target]))
    assert_close_fp32(ra.metric, loss, n_terms=MODEL_TERMS)
    assert_close_fp32(ra.patterns, patterns, n_terms=MODEL_TERMS)
    assert_close_fp32(ra.maps, ref, n_terms=MODEL_TERMS)
    gf = tlb.gradient_factors(model, ids, target, modules=["mlp_in", "mlp_out"])
    with torch.enable_grad():
        logits = hf(ids).logits
        nll = -torch.log_softmax(logits[0, -1], -1)[target]
        blocks = hf.transformer.h
        weights = [w for b in blocks for w in (b.mlp.c_fc.weight, b.mlp.c_proj.weight)]
        grads = torch.autograd.grad(nll, weights)
    for l in range(len(blocks)):
        assert_close_fp32(gf[l, "mlp_in"].reconstruct(), grads[2 * l], n_terms=MODEL_TERMS, what=f"W_in {l}")
        assert_close_fp32(gf[l, "mlp_out"].reconstruct(), grads[2 * l + 1], n_terms=MODEL_TERMS, what=f"W_out {l}")


def test_activation_cache_utilities_work_on_a_hooked_cache():
    """cache.activation_cache() is TransformerLens's own ActivationCache around the HookedTransformer: its
    accumulated_resid / decompose_resid equal run_with_cache's; gradient_cache() stacks the gradients."""
    model = hooked("gpt2_ln")
    toks = tokens()
    cache = tlb.capture(model, toks, tlb.metrics.target_nll(TARGET))
    _, ref = model.run_with_cache(toks)
    ac = cache.activation_cache()
    assert torch.equal(ac.accumulated_resid(), ref.accumulated_resid())
    assert torch.equal(ac.decompose_resid(), ref.decompose_resid())
    gc = cache.gradient_cache()
    assert torch.equal(gc["resid_pre", 1], cache.grad("resid_pre", 1))
    assert gc.accumulated_resid().shape == (BASE["n_layers"] + 1, *toks.shape, BASE["d_model"])  # resid_pre each, final
