"""The conformance matrix as tests: a cell fails only on FAIL (wrong numbers, a crash that is not a
TLBackwardError, a silent zero); exact and refused (a TLBackwardError naming why) pass.

The fast rows run in ``make test``; the whole matrix runs under ``-m conformance`` (``.ci/run``).
The README's support-matrix block must equal what tests/conformance/matrix.py renders from the saved
matrix.json, so the table is generated, never written by hand.
"""

import json

import pytest
import torch

from tests.conformance import cells, matrix
from tests.conformance import hf_ref as R
from tests.conformance import moe_ref as M
from tests.conformance.cells import FEATURES, outcome_of, run_cell
from tests.families import FAMILIES
from tl_backward.errors import TLBackwardError

# Cells measured as FAIL and not yet fixed (issue 14 stays open for them). xfail is strict: a fix
# turns the cell into XPASS, which fails the run until the cell leaves this list.
KNOWN_FAILS: dict[tuple[str, str], str] = {}
ALL = [pytest.param(row, f, marks=pytest.mark.xfail(reason=KNOWN_FAILS[row, f], strict=True))
       if (row, f) in KNOWN_FAILS else (row, f) for row in cells.BUILDERS for f in FEATURES]
FAST = [(row, f) for row in matrix.FAST_ROWS for f in FEATURES]


def _check(row: str, feature: str) -> None:
    o = run_cell(row, feature)
    assert o.status != "FAIL", f"{row} × {feature}: {o.detail}"
    if o.status == "refused":
        assert len(o.detail) > 20, f"{row} × {feature}: a refusal must say why, got {o.detail!r}"


@pytest.mark.parametrize("row,feature", FAST, ids=[f"{r}-{f}" for r, f in FAST])
def test_fast_cell(row, feature):
    _check(row, feature)


@pytest.mark.conformance
@pytest.mark.parametrize("row,feature", ALL, ids=lambda v: str(v))
def test_matrix_cell(row, feature):
    _check(row, feature)


def test_registry_covers_every_family_with_tiny_configs():
    assert len(FAMILIES) == 32
    hf, bridge = cells.built("llama")
    assert hf.config.num_hidden_layers in (2, 3) and hf.config.hidden_size in (32, 64)
    assert hf.config.num_key_value_heads < hf.config.num_attention_heads  # GQA where the family has it
    assert hf.config.vocab_size == bridge.cfg.d_vocab
    assert cells.built("gemma2")[0].config.attn_logit_softcapping  # soft-capping on
    norms = [p for n, p in hf.named_parameters() if "norm" in n]
    assert norms and all(not torch.equal(p, torch.ones_like(p)) for p in norms)  # perturbed gains


def test_outcomes_classify_refusals_failures_and_crashes():
    def refuse():
        raise TLBackwardError("this model cannot do that: use another", argument="model")

    def wrong():
        cells.close(torch.ones(3), 2 * torch.ones(3), "x")

    def zero():
        cells.close(torch.zeros(3), torch.zeros(3), "x")

    assert outcome_of(lambda: None).status == "exact"
    assert outcome_of(refuse).status == "refused" and "cannot do that" in outcome_of(refuse).detail
    assert outcome_of(wrong).status == "FAIL"
    assert outcome_of(zero).status == "FAIL"  # a silent zero cannot pass
    assert outcome_of(lambda: {}["k"]).status == "FAIL"


def test_cells_can_fail(monkeypatch):
    """A reference off by a factor of two in the attention scale turns RA into a FAIL."""
    scale = R.attention_scale
    monkeypatch.setattr(R, "attention_scale", lambda *a: 2 * scale(*a))
    assert run_cell("gpt2", "RA").status == "FAIL"


def test_moe_cells_can_fail(monkeypatch):
    """A MoE reference that swaps the experts' gate and up halves turns the factors cell into a FAIL."""
    base = run_cell("qwen3_moe", "factors")
    if base.status == "refused":  # TransformerLens 3.x's MoE bridge has no batched experts / router weights
        pytest.skip(f"this TransformerLens refuses MoE factors: {base.detail}")
    assert base.status == "exact", base.detail
    layout = M.tl_layout
    monkeypatch.setattr(M, "tl_layout", lambda block, grads: {
        **layout(block, grads), "mlp_in": layout(block, grads)["mlp_gate"], "mlp_gate": layout(block, grads)["mlp_in"]})
    o = run_cell("qwen3_moe", "factors")
    assert o.status == "FAIL" and "mlp_in" in o.detail


def test_softcap_reference_is_the_gradient_with_respect_to_q_dot_k():
    """Gemma-2 (soft-cap on): the RA reference r = ∂L/∂(q·kᵀ) must satisfy ∂L/∂q_i = Σ_j r_ij k_j,
    q and k as HF's own attention function receives them (autograd on the HF model)."""
    hf, _ = cells.built("gemma2")
    tokens = torch.tensor([[1, 20, 25, 26, 24, 22, 7]])
    ref = R.run(hf, tokens)
    loss = R.nll(ref.logits, torch.tensor([0]), torch.tensor([6]), torch.tensor([cells.TARGET]))
    queries = [q for q, _ in ref.qk_inputs]
    dps = torch.autograd.grad(loss, list(ref.attentions), retain_graph=True)
    dqs = torch.autograd.grad(loss, queries)
    cap = hf.config.attn_logit_softcapping
    for l, (p, dp) in enumerate(zip(ref.attentions, dps)):
        r = R.reversed_attention(p, dp, R.attention_scale(hf, l, False), ref.qk[l], cap)
        k = ref.qk_inputs[l][1]
        cells.close(torch.einsum("bhqk,bhkd->bhqd", r, k.double()), dqs[l], f"dL/dq layer {l}")


def test_codegen_is_refused_naming_the_transformerlens_problem():
    o = run_cell("codegen", "capture")
    assert o.status == "refused" and "embed_positions" in o.detail and "TransformerLens" in o.detail


def test_readme_matrix_is_the_generated_one():
    saved = json.loads(matrix.JSON_PATH.read_text())
    assert set(saved["rows"]) == set(cells.BUILDERS) and saved["features"] == list(FEATURES)
    assert matrix.readme_block() == matrix.render(saved), (
        "README.md's support matrix is not the generated one: run python -m tests.conformance.matrix")


@pytest.mark.parametrize("row", ["cohere", "granite"])
def test_lens_applies_the_models_output_transform(row):
    """Cohere multiplies its logits by logit_scale, Granite divides by logits_scaling: the lens (and
    every readout through ModelAdapter.unembedding) must reproduce them."""
    assert run_cell(row, "lens").status == "exact"
