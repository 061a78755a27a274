"""Gradient factors on mixture-of-experts models against plain Hugging Face autograd.

Independent route: a deep copy of the HF model taken *before* TransformerLens wraps it computes the
same loss (the target's NLL at each row's last real token, summed), and ``torch.autograd.grad``
gives the gradient of every expert, router and attention parameter. Each is mapped to
TransformerLens layout here, by hand, from the HF class's documented storage: Mixtral / OLMoE /
Qwen-MoE keep ``gate_up_proj [expert, 2·d_expert, d_model]`` (rows ``[gate | up]``) and
``down_proj [expert, d_model, d_expert]`` ([out, in]); GPT-OSS keeps ``[expert, d_model, 2·d_expert]``
with gate and up *interleaved* (columns 0, 2, … are the gate) and ``down_proj [expert, d_expert,
d_model]`` ([in, out]). Routing sets are checked against the copied HF router's own top-k.
"""

import copy
import logging

import pytest
import torch

from tests.conformance.moe_ref import factor_parameters, router_of, tl_layout
from tests.reference import assert_no_hooks, assert_untouched
from tests.tolerance import MODEL_TERMS, fp32_rtol
from tl_backward.core.adapter import get_adapter
from tl_backward.core.compat import TL_MAJOR, TL_VERSION
from tl_backward.errors import TLBackwardError
from tl_backward.lens import backward_lens, expert_lens, forward_pass_shift, gradient_factors
from tl_backward.zoo.tiny import word_tokenizer

PROMPTS = ["the capital of france is", "a big dog ran to the"]
TARGET = " paris"
N_EXPERTS, TOP_K = 4, 2
# Whole-model fp32 comparison (tests/tolerance.py); the brief's bound 1e-4 is looser.
TOL = min(fp32_rtol(MODEL_TERMS), 1e-4)
FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "gpt_oss")
# TransformerLens 3.9's MoE bridges expose no router bridge with routing weights: tl_backward refuses
# their MoE layers (test_moe_layers_refused_on_transformer_lens_3).
needs_tl4 = pytest.mark.skipif(TL_MAJOR < 4, reason=f"MoE factors need TransformerLens 4.x (installed {TL_VERSION})")


def hf_config(family: str, vocab: int):
    from transformers import GptOssConfig, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0, tie_word_embeddings=False, num_experts_per_tok=TOP_K)
    if family == "mixtral":
        cfg = MixtralConfig(intermediate_size=48, num_local_experts=N_EXPERTS, **common)
        arch = "MixtralForCausalLM"
    elif family == "olmoe":
        cfg = OlmoeConfig(intermediate_size=48, num_experts=N_EXPERTS, **common)
        arch = "OlmoeForCausalLM"
    elif family == "qwen2_moe":  # with its gated shared expert; norm_topk_prob off: weights sum < 1
        cfg = Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                             num_experts=N_EXPERTS, **common)
        arch = "Qwen2MoeForCausalLM"
    elif family == "qwen3_moe":
        cfg = Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=24, num_experts=N_EXPERTS, head_dim=8,
                             norm_topk_prob=True, **common)
        arch = "Qwen3MoeForCausalLM"
    else:  # GPT-OSS: biased, transposed, interleaved experts; clamped SwiGLU; attention sinks
        cfg = GptOssConfig(intermediate_size=24, num_local_experts=N_EXPERTS, head_dim=8, sliding_window=16,
                           layer_types=["sliding_attention", "full_attention"], **common)
        arch = "GptOssForCausalLM"
    cfg.architectures = [arch]
    cfg._attn_implementation = "eager"
    return cfg


def perturb(model, seed: int) -> None:
    """Random weights N(0, 0.1) (embeddings 0.5), norm gains 1 + N(0, 0.1), biases N(0, 0.1):
    the HF init leaves routers at zero in some families, where routing would be a tie."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_((0.5 if "embed" in name else 0.1) * r)
            else:
                p.copy_(1 + 0.1 * r if "norm" in name else 0.1 * r)


_BUILT: dict = {}


def build(family: str):
    """(bridge, plain HF copy with the same weights), cached per family."""
    if family not in _BUILT:
        from transformers import AutoModelForCausalLM

        from tl_backward.core.compat import TransformerBridge

        tok = word_tokenizer()
        cfg = hf_config(family, len(tok))
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(cfg).eval()
        perturb(hf, 1)
        ref = copy.deepcopy(hf)
        logging.disable(logging.WARNING)  # TransformerLens's deprecation notice for the alias names
        try:
            bridge = TransformerBridge.boot_transformers(cfg.architectures[0], hf_model=hf, tokenizer=tok)
        finally:
            logging.disable(logging.NOTSET)
        _BUILT[family] = (bridge, ref)
    return _BUILT[family]


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def hf_loss(ref, gf, target_id):
    logits = ref(gf.tokens).logits
    rows = torch.arange(len(gf.last))
    return -torch.log_softmax(logits[rows, gf.last].float(), -1)[:, target_id].sum()


def hf_expected(ref, layer: int, grads: dict) -> dict:
    """TL-layout gradients of one layer, from the HF parameter gradients (MoE modules:
    tests/conformance/moe_ref.py; attention split by head here)."""
    mlp, attn = ref.model.layers[layer].mlp, ref.model.layers[layer].self_attn
    moe = tl_layout(mlp, {m: grads[p] for m, p in factor_parameters(mlp).items()})
    H, KV, dh = 4, 2, attn.head_dim
    return {
        **moe,
        "q": grads[attn.q_proj.weight].reshape(H, dh, -1).transpose(1, 2),
        "k": grads[attn.k_proj.weight].reshape(KV, dh, -1).transpose(1, 2),
        "v": grads[attn.v_proj.weight].reshape(KV, dh, -1).transpose(1, 2),
        "o": grads[attn.o_proj.weight].T.reshape(H, dh, -1),
    }


def hf_grads(ref, gf, target_id):
    params = [p for l in range(2) for m in (ref.model.layers[l].mlp, ref.model.layers[l].self_attn)
              for p in m.parameters()]
    grads = torch.autograd.grad(hf_loss(ref, gf, target_id), params, allow_unused=True)
    return {p: g for p, g in zip(params, grads)}


@needs_tl4
@pytest.mark.parametrize("family", FAMILIES)
def test_every_factor_matches_hf_autograd(family):
    bridge, ref = build(family)
    gf = gradient_factors(bridge, PROMPTS, TARGET, modules="all", prepend_bos=False)
    has_shared = hasattr(ref.model.layers[0].mlp, "shared_expert")  # Qwen2-MoE
    shared = ("shared_in", "shared_gate", "shared_out", "shared_expert_gate") if has_shared else ()
    assert gf.modules == ("mlp_in", "mlp_gate", "mlp_out", "q", "k", "v", "o", "router", *shared)
    assert bool((~gf.mask).any()), "the batch should be padded"
    t = int(get_adapter(bridge).target_tokens(TARGET)[0])
    grads = hf_grads(ref, gf, t)
    for layer in range(2):
        expected = hf_expected(ref, layer, grads)
        assert set(expected) == set(gf.modules)  # every module of "all" is checked, and only those
        for m, want in expected.items():
            f = gf[layer, m]
            assert f.per_expert == m.startswith("mlp_")
            got = f.reconstruct()
            assert got.shape == want.shape, (family, layer, m)
            err = rel_err(got, want)
            assert err < TOL, f"{family} layer {layer} {m}: rel. error {err:.2e}"
        for e in range(N_EXPERTS):  # one expert's factor is that expert's gradient
            assert rel_err(gf[layer, "mlp_out", e].reconstruct(), expected["mlp_out"][e]) < TOL
    assert_no_hooks(bridge)
    assert_untouched(bridge)


def _mlp_inputs(ref, tokens):
    """The MoE blocks' inputs in the plain HF model, flattened [batch·pos, d_model]."""
    seen = {}
    handles = [ref.model.layers[l].mlp.register_forward_pre_hook(
        lambda mod, args, l=l: seen.__setitem__(l, args[0].detach().reshape(-1, args[0].shape[-1])))
        for l in range(2)]
    try:
        with torch.no_grad():
            ref(tokens)
    finally:
        for h in handles:
            h.remove()
    return seen


@needs_tl4
@pytest.mark.parametrize("family", FAMILIES)
def test_routing_and_unrouted_rows(family):
    bridge, ref = build(family)
    gf = gradient_factors(bridge, PROMPTS, TARGET, modules=("mlp_in", "mlp_out"), prepend_bos=False)
    inputs = _mlp_inputs(ref, gf.tokens)
    flat_mask = gf.mask.reshape(-1)
    for layer in range(2):
        router = router_of(ref.model.layers[layer].mlp)
        with torch.no_grad():
            _, _, idx = router(inputs[layer])
        idx = idx[flat_mask]
        for m in ("mlp_in", "mlp_out"):
            f = gf[layer, m]
            for e in range(N_EXPERTS):
                want = (idx == e).any(-1).nonzero()[:, 0]
                assert torch.equal(f.tokens_of(e), want), (family, layer, m, e)
                unrouted = ~f.routed[e]
                assert bool((f.delta[e][unrouted] == 0).all())
        assert bool((gf[layer, "mlp_out"].routed.sum(0) == TOP_K).all())
        assert gf[layer, "mlp_in"].x.stride(0) == 0  # one x shared by the experts


@needs_tl4
def test_mlp_gate_is_the_experts_gate_never_the_router():
    bridge, ref = build("mixtral")
    ad = get_adapter(bridge)
    with pytest.raises(TLBackwardError, match="router") as err:
        ad.linear(0, "mlp_gate")
    assert err.value.argument == "module"
    gf = gradient_factors(bridge, PROMPTS[0], TARGET, modules=("mlp_gate", "router"), prepend_bos=False)
    assert gf[0, "mlp_gate"].shape == (N_EXPERTS, 32, 48)
    assert gf[0, "router"].shape == (32, N_EXPERTS) and gf[0, "router"].weight_name == "W_router"
    moe = ad.moe(0)
    assert torch.equal(moe.weight("mlp_gate"), ref.model.layers[0].mlp.experts.gate_up_proj[:, :48].transpose(1, 2))


@needs_tl4
@pytest.mark.parametrize("family", ("mixtral", "gpt_oss"))
def test_expert_lens_against_explicit_projection(family):
    bridge, ref = build(family)
    el = expert_lens(bridge, PROMPTS, TARGET, prepend_bos=False, top_k=3)
    gf = gradient_factors(bridge, PROMPTS, TARGET, modules=("mlp_out",), prepend_bos=False)
    t = int(get_adapter(bridge).target_tokens(TARGET)[0])
    grads = hf_grads(ref, gf, t)
    for i, layer in enumerate(el.layers):
        want = hf_expected(ref, layer, grads)["mlp_out"].flatten(1).norm(dim=-1)
        assert rel_err(el.grad_norm[i], want) < TOL
        assert abs(float(el.share[i].sum()) - 1) < 1e-6
        assert el.top_experts(layer, 1) == [int(want.argmax())]
        f = gf[layer, "mlp_out"]
        for e in range(N_EXPERTS):
            for tok in f.tokens_of(e).tolist():
                d = f.delta[e, tok]
                if not bool(d.any()):  # e.g. the last layer's δ before the last position: a zero vector ties
                    continue
                with torch.no_grad():  # the HF final norm and lm_head, applied by hand
                    logits = ref.lm_head(ref.model.norm(d)).float()
                assert int(el.target_rank[i, e, tok]) == int((logits > logits[t]).sum())
                assert int(el.bottom_ids[i, e, tok, 0]) == int(logits.argmin())
            assert bool((el.bottom_ids[i, e][~f.routed[e]] == -1).all())
    assert_no_hooks(bridge)
    assert_untouched(bridge)
    for obj in (el, get_adapter(bridge).moe(0), gf, gf[0, "mlp_out"]):  # one short line (tests/test_reprs.py)
        text = repr(obj)
        assert text.startswith(type(obj).__name__ + "(") and "\n" not in text and len(text) < 200
        assert "tensor(" not in text


@needs_tl4
def test_backward_lens_runs_on_moe_and_reads_the_experts_sum():
    bridge, _ = build("qwen2_moe")
    lens = backward_lens(bridge, PROMPTS, TARGET, modules="all", prepend_bos=False)
    gf = lens.factors
    for i, layer in enumerate(lens.layers):
        summed = gf[layer, "mlp_out"].delta.sum(0)  # Σ_e w_ie·g_i
        assert torch.allclose(lens["mlp_out"].norm[i], summed.norm(dim=-1), rtol=1e-5, atol=1e-7)
        assert torch.equal(lens["router"].top_ids[i], lens["mlp_in"].top_ids[i])  # both read x
    assert "router" in repr(lens)
    with pytest.raises(TLBackwardError, match="mixtures of experts"):
        lens.imprint_shift(0, 0.1)
    sub = gf.select_tokens([0, 2])
    assert sub[0, "mlp_out"].routed.shape == (N_EXPERTS, 2)
    assert torch.equal(sub[0, "mlp_out"].routed, gf[0, "mlp_out"].routed[:, [0, 2]])


@needs_tl4
@pytest.mark.parametrize("family", ("mixtral", "qwen2_moe", "gpt_oss"))
def test_forward_pass_shift_on_moe(family):
    """FPS edits the routed experts' down projections: the MoE output at the last position changes by
    η Σ_e w_e‖h^e‖² e_t (measured on the model before / after), and undo restores every bit."""
    bridge, ref = build(family)
    prompt, layer = "the capital of france is", 0
    down = ref.model.layers[layer].mlp.experts.down_proj
    param = get_adapter(bridge).moe(layer).experts.down_proj
    before_w = param.detach().clone()
    tokens = get_adapter(bridge).tokenize(prompt).tokens
    name = f"blocks.{layer}.hook_mlp_out"
    with torch.no_grad():
        before = bridge.run_with_cache(tokens, names_filter=[name])[1][name][0, -1]
        hf_in = _mlp_inputs(ref, tokens)[layer][-1]
        _, w, idx = router_of(ref.model.layers[layer].mlp)(hf_in[None])
    t = next(i for i in range(5, 40) if i != int(bridge(tokens)[0, -1].argmax()))
    with forward_pass_shift(bridge, prompt, t, layer=layer, eta=0.5) as edit:
        assert edit.applied and list(edit.experts) == idx[0].tolist()
        assert torch.allclose(edit.weights, w[0], rtol=1e-6)
        with torch.no_grad():
            after = bridge.run_with_cache(tokens, names_filter=[name])[1][name][0, -1]
        changed = (param != before_w).flatten(1).any(-1)
        assert changed.nonzero()[:, 0].tolist() == sorted(edit.experts)  # only the routed experts
        err = rel_err(after - before, edit.mlp_out_change)
        assert err < 1e-4, f"{family}: predicted vs actual mlp_out change, rel. error {err:.2e}"
        assert edit.delta.shape == (TOP_K, *edit.x.shape[1:], 32)
        assert "experts" in repr(edit)
    assert torch.equal(param, before_w) and down.shape == param.shape
    assert_no_hooks(bridge)
    assert_untouched(bridge)


@needs_tl4
def test_refusals_name_the_argument():
    bridge, _ = build("olmoe")
    gf = gradient_factors(bridge, PROMPTS[0], TARGET, modules=("mlp_out",), prepend_bos=False)
    with pytest.raises(TLBackwardError) as err:
        gf[0, "mlp_out"].expert(N_EXPERTS)
    assert err.value.argument == "expert"
    with pytest.raises(TLBackwardError) as err:
        gradient_factors(bridge, PROMPTS[0], TARGET, modules=("gate",))
    assert err.value.argument == "modules"
    with pytest.raises(TLBackwardError) as err:
        expert_lens(bridge, PROMPTS[0], None)
    assert err.value.argument == "target"
    with pytest.raises(TLBackwardError) as err:
        expert_lens(bridge, PROMPTS[0], TARGET, module="router")
    assert err.value.argument == "module"
    assert_no_hooks(bridge)
    assert_untouched(bridge)


@needs_tl4
def test_shared_expert_factors_are_2d_and_refused_without_one():
    """Qwen2-MoE's shared expert: plain 2-D factors over all tokens (the sigmoid gate inside δ, so
    δ of its down projection is σ(s_i)·g_i); no shared expert elsewhere."""
    bridge, ref = build("qwen2_moe")
    gf = gradient_factors(bridge, PROMPTS, TARGET, modules=("mlp_out", "shared_out", "shared_expert_gate"),
                          prepend_bos=False)
    f = gf[0, "shared_out"]
    assert not f.per_expert and f.shape == (40, 32) and gf[0, "shared_expert_gate"].shape == (32, 1)
    x = _mlp_inputs(ref, gf.tokens)[0][gf.mask.reshape(-1)]
    block = ref.model.layers[0].mlp
    with torch.no_grad():
        sig = torch.sigmoid(block.shared_expert_gate(x))  # [tokens, 1]
        _, weights, idx = router_of(block)(x)  # the HF router's own top-k weights
    out = gf[0, "mlp_out"]
    for tok in range(len(x)):  # δ_out^e = w_ie·g_i (expert e = the first routed), δ_shared = σ(s_i)·g_i
        g = out.delta[int(idx[tok, 0]), tok] / weights[tok, 0]
        assert rel_err(f.delta[tok], sig[tok] * g) < TOL
    bridge_mix, _ = build("mixtral")
    assert "shared_out" not in gradient_factors(bridge_mix, PROMPTS[0], TARGET, modules="all").modules
    with pytest.raises(TLBackwardError, match="shared expert") as err:
        gradient_factors(bridge_mix, PROMPTS[0], TARGET, modules=("shared_in",))
    assert err.value.argument == "modules"
    assert_no_hooks(bridge)
    assert_untouched(bridge)


def test_router_refused_on_dense_models(llama_model):
    with pytest.raises(TLBackwardError, match="mixture-of-experts") as err:
        gradient_factors(llama_model, "the cat sat", " dog", modules=("router",))
    assert err.value.argument == "modules"
    gf = gradient_factors(llama_model, "the cat sat", " dog", modules="all")
    assert "router" not in gf.modules and not gf[0, "mlp_in"].per_expert
    with pytest.raises(TLBackwardError) as err:
        expert_lens(llama_model, "the cat sat", " dog")
    assert err.value.argument == "layers"


@pytest.mark.skipif(TL_MAJOR >= 4, reason="TransformerLens 4.x bridges MoE routers (the tests above)")
def test_moe_layers_refused_on_transformer_lens_3():
    bridge, _ = build("mixtral")
    with pytest.raises(TLBackwardError, match="no single router bridge") as err:
        gradient_factors(bridge, PROMPTS[0], TARGET, modules=("mlp_out",), prepend_bos=False)
    assert err.value.argument == "model"
