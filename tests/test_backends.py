"""Every public analysis on both backends: a TransformerBridge and a HookedTransformer holding the same
tiny HF GPT-2 / Llama (GQA, rotary, gated MLP) weights (TransformerLens's own weight conversion,
tl_backward/core/hooked_loading.py), each checked against plain-HF autograd where a reference is cheap
(residual gradients, RA, parameter gradients, ‖RA‖ rankings, patching's first-order effect, head
ablation), and the hooked results against the bridge's (which tests/attention, tests/lens, tests/flow
check against HF) everywhere else. The ``subject`` fixture is parametrised over family × backend; the
hooked half is skipped on TransformerLens 4.x, which has no HookedTransformer (run it in the
TransformerLens 3.9 venv: ``make test-tl39``).
"""

from __future__ import annotations

import copy

import pytest
import torch

import tl_backward as tlb
from tests.attention.test_reversed import hf_reference
from tests.conftest import SPECS
from tests.reference import assert_no_hooks, assert_untouched
from tests.tolerance import MODEL_TERMS, assert_close_fp32
from tl_backward.core.compat import TL_VERSION, HookedTransformer
from tl_backward.core.hooked_loading import hooked_from_hf
from tl_backward.zoo.tiny import tiny_hf_model, tiny_model, word_tokenizer

FAMILIES = ("gpt2", "llama")
BACKENDS = ("bridge", "hooked")
IDS = torch.tensor([[1, 7, 12, 5, 33, 9, 20], [1, 14, 8, 30, 6, 22, 3]])
TARGET = 11


def _build(family: str, backend: str):
    """(model, plain HF model with the same weights) for ``backend``."""
    hf = tiny_hf_model(family, **SPECS[family])
    if backend == "bridge":
        return tiny_model(family, **SPECS[family]), hf
    if HookedTransformer is None:
        pytest.skip(f"TransformerLens {TL_VERSION} has no HookedTransformer (removed in 4.0): make test-tl39")
    model = hooked_from_hf(copy.deepcopy(hf), word_tokenizer(), f"tiny-{family}", torch.device("cpu"), torch.float32)
    return model, hf


@pytest.fixture(scope="module", params=[(f, b) for f in FAMILIES for b in BACKENDS], ids=lambda p: "-".join(p))
def subject(request):
    family, backend = request.param
    model, hf = _build(family, backend)
    return family, backend, model, hf


@pytest.fixture(scope="module")
def twin(subject):
    """The bridge of the subject's family (the subject itself on the bridge backend)."""
    family, backend, model, _ = subject
    return model if backend == "bridge" else _build(family, "bridge")[0]


def _hf_loss(hf, ids=IDS, target=TARGET, **kw):
    out = hf(ids, **kw)
    rows = torch.arange(len(ids))
    return -torch.log_softmax(out.logits[:, -1].float(), -1)[rows, target].sum(), out


def _nll(model, ids=IDS) -> float:
    with torch.no_grad():
        logits = model(ids, return_type="logits")
    return float(-torch.log_softmax(logits[:, -1].double(), -1)[:, TARGET].sum())


def _hf_weights(family: str, hf, layer: int) -> dict[str, torch.Tensor]:
    """HF parameters of ``layer`` in TL layout [d_in, d_out] (GPT-2's Conv1D already is; nn.Linear is transposed)."""
    if family == "gpt2":
        b = hf.transformer.h[layer]
        return {"mlp_in": b.mlp.c_fc.weight, "mlp_out": b.mlp.c_proj.weight}
    b = hf.model.layers[layer]
    return {"mlp_in": b.mlp.up_proj.weight, "mlp_gate": b.mlp.gate_proj.weight, "mlp_out": b.mlp.down_proj.weight}


# ---------------------------------------------------------------------------------------------- core
def test_capture_residual_gradients_match_hf_autograd(subject):
    family, _, model, hf = subject
    n = model.cfg.n_layers
    cache = tlb.capture(model, IDS, tlb.metrics.target_nll(TARGET), names=[f"blocks.{l}.hook_resid_pre" for l in range(n)])
    with torch.enable_grad():
        loss, out = _hf_loss(hf, output_hidden_states=True)
        grads = torch.autograd.grad(loss, out.hidden_states[:n])
    for l in range(n):
        assert_close_fp32(cache["resid_pre", l], out.hidden_states[l], n_terms=MODEL_TERMS, what=f"resid_pre {l}")
        assert_close_fp32(cache.grad("resid_pre", l), grads[l], n_terms=MODEL_TERMS, what=f"∂L/∂resid_pre {l}")
    assert_no_hooks(model)
    assert_untouched(model)


# ---------------------------------------------------------------------------------------------- RA
def test_reversed_attention_matches_hf_autograd(subject):
    family, _, model, _ = subject
    ra = tlb.reversed_attention(model, IDS, TARGET)
    ref, patterns, loss = hf_reference(family, SPECS[family], IDS, torch.tensor([IDS.shape[1] - 1] * 2),
                                       torch.tensor([TARGET] * 2))
    assert_close_fp32(ra.metric, loss, n_terms=MODEL_TERMS)
    assert_close_fp32(ra.patterns, patterns, n_terms=MODEL_TERMS)
    assert_close_fp32(ra.maps, ref, n_terms=MODEL_TERMS)
    assert_no_hooks(model)


def test_rank_heads_is_the_mean_ra_norm(subject):
    family, _, model, _ = subject
    ranking = tlb.rank_heads(model, IDS, TARGET)
    norms = []
    for row in IDS:
        ref, _, _ = hf_reference(family, SPECS[family], row[None], torch.tensor([IDS.shape[1] - 1]),
                                 torch.tensor([TARGET]))
        norms.append(ref[:, 0].flatten(-2).norm(dim=-1))  # [layer, head]
    assert_close_fp32(ranking.reversed_mean, torch.stack(norms).mean(0), n_terms=MODEL_TERMS)


def test_patching_moves_the_loss_by_ra_dot_dp(subject):
    """P' = P + η·RA: dL/dη at 0 equals Σ_l ⟨∂L/∂P_l, RA_l⟩ with ∂L/∂P from plain-HF autograd."""
    family, _, model, hf = subject
    ra = tlb.reversed_attention(model, IDS, TARGET)
    with torch.enable_grad():
        loss, out = _hf_loss(hf, output_attentions=True)
        dps = torch.autograd.grad(loss, out.attentions)
    slope = sum(float((dp.double() * ra.maps[l].double()).sum()) for l, dp in enumerate(dps))
    assert slope > 0
    eta = 0.01 / slope  # a loss change of ~0.01, far above fp32 loss noise
    with tlb.patch_attention(model, ra, eta=eta):
        higher = _nll(model)
    with tlb.patch_attention(model, ra, eta=-eta):
        lower = _nll(model)
    assert (higher - lower) / (2 * eta) == pytest.approx(slope, rel=1e-3)
    assert _nll(model) == pytest.approx(float(loss.detach()), rel=1e-5)
    assert_no_hooks(model)


def test_zero_heads_equals_hf_with_the_head_removed(subject):
    """Ablating (1, 2) = zeroing that head's slice of the HF output projection's input."""
    family, _, model, hf = subject
    d_head = model.cfg.d_head
    attn = hf.transformer.h[1].attn.c_proj if family == "gpt2" else hf.model.layers[1].self_attn.o_proj

    def drop_head(module, args):
        x = args[0].clone()
        x[..., 2 * d_head:3 * d_head] = 0
        return (x,)

    handle = attn.register_forward_pre_hook(drop_head)
    try:
        with torch.no_grad():
            expected = hf(IDS).logits
    finally:
        handle.remove()
    with tlb.zero_heads(model, [(1, 2)]):
        with torch.no_grad():
            got = model(IDS, return_type="logits")
    assert_close_fp32(got, expected, n_terms=MODEL_TERMS)
    assert_no_hooks(model)


# ---------------------------------------------------------------------------------------------- Backward Lens
def test_gradient_factors_are_the_hf_parameter_gradients(subject):
    family, _, model, hf = subject
    modules = ["mlp_in", "mlp_out"] + (["mlp_gate"] if family == "llama" else [])
    gf = tlb.gradient_factors(model, IDS, TARGET, modules=modules)
    with torch.enable_grad():
        loss, _ = _hf_loss(hf)
        weights = [(l, m, w) for l in range(model.cfg.n_layers) for m, w in _hf_weights(family, hf, l).items()]
        grads = torch.autograd.grad(loss, [w for _, _, w in weights])
    for (l, m, w), g in zip(weights, grads):
        ref = g if family == "gpt2" else g.T  # nn.Linear stores [out, in]
        assert_close_fp32(gf[l, m].reconstruct(), ref, n_terms=MODEL_TERMS, what=f"{m} {l}")
    assert_untouched(model)


def test_every_factor_and_the_lens_agree_across_backends(subject, twin):
    """All modules' factors and the vocabulary projections of the hooked model equal the bridge's."""
    _, backend, model, _ = subject
    if backend == "bridge":
        pytest.skip("the reference of this comparison")
    got, ref = (tlb.gradient_factors(m, IDS, TARGET, modules="all") for m in (model, twin))
    assert got.modules == ref.modules
    for l in range(model.cfg.n_layers):
        for m in got.modules:
            assert_close_fp32(got[l, m].reconstruct(), ref[l, m].reconstruct(), n_terms=MODEL_TERMS, what=f"{m} {l}")
    lens_got, lens_ref = (tlb.backward_lens(m, IDS[:1], TARGET) for m in (model, twin))
    for m in lens_ref.modules:
        a, b = lens_got[m], lens_ref[m]
        assert torch.equal(a.target_rank, b.target_rank), m  # a near-tie could swap; none at these seeds
        assert_close_fp32(a.top_logits, b.top_logits, n_terms=MODEL_TERMS, what=f"lens {m} top logits")
        assert_close_fp32(a.norm, b.norm, n_terms=MODEL_TERMS, what=f"lens {m} norms")


# ---------------------------------------------------------------------------------------------- MAS
PROMPTS = [["the cat sat on", "where is the cat ?"], ["big dog", "red", "what is it"]]
ANSWERS = ["A :", "A"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_segment_mask_and_mas_generate_agree_across_backends(subject, twin, side):
    """Under one segment mask the hooked model's logits and greedy continuation equal the bridge's (the
    bridge's are checked against an explicit MAS reference in tests/masking; the hooked path against its
    own in tests/masking/test_hooked_mas.py)."""
    _, backend, model, _ = subject
    if backend == "bridge":
        pytest.skip("the reference of this comparison")
    logits, generated = [], []
    for m in (model, twin):
        seg = tlb.segments.from_blocks(m, PROMPTS, ANSWERS, padding_side=side)
        with tlb.segment_mask(m, seg):
            with torch.no_grad():
                logits.append(m(seg.tokens, return_type="logits")[seg.valid])
        generated.append(tlb.mas_generate(m, seg, max_new_tokens=4, eos_token_id=None).new_tokens)
        assert_no_hooks(m)
    assert_close_fp32(logits[0], logits[1], n_terms=MODEL_TERMS, what="logits under the segment mask")
    assert torch.equal(generated[0], generated[1])
