"""Every public result type prints as one short line (class name, shapes, headline figures), never
a tensor dump: a notebook cell that ends in a result must stay readable."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import warnings

import pytest
import torch

import tl_backward as tlb
from tl_backward.core.adapter import get_adapter
from tl_backward.core.stream import stream
from tl_backward.core.sweep import run_sweep
from tl_backward.attention.icl import icl_patching, world_pairs
from tl_backward.attention.perturbation import icl_perturbation
from tl_backward.lens.experiment import run as editing_run
from tl_backward.masking.experiment import mas_comparison, world_task, qa_segments
from tl_backward.report import build_report
from tl_backward.flow.findings import ln_filter, regularisation_neurons
from tl_backward.flow.project import project
from tl_backward.lens.projection import vocab_readout
from tl_backward.masking.finetune import preserving_weights
from tl_backward.zoo.world import World

MAX_CHARS = 200
PROMPT = "the capital of france is"

# Dataclasses that are not analysis results, with the reason they need no short repr.
NOT_RESULTS = {
    "_Request": "private to capture",
    "TargetNLL": "metric spec: its repr is its target", "LogitDiff": "metric spec: its repr is its tokens",
    "RowTargetNLL": "metric spec: its repr is its ids", "Picked": "a bound metric (core/stream.py internals)",
    "LayerData": "flow builder internals", "NodeSpec": "flow builder internals", "EdgeSpec": "flow builder internals",
    "LayerIds": "flow builder internals", "LayerTensors": "flow builder internals",
    "Relation": "zoo world data", "SegmentExample": "zoo world data", "Fact": "zoo world data",
    "World": "zoo world data", "TrainConfig": "zoo training config",
    "MoELayer": "needs an MoE model: repr checked in tests/lens/test_moe_factors.py",
    "ExpertLens": "needs an MoE model: repr checked in tests/lens/test_moe_factors.py",
    "ScoreRoute": "attention-route strategy", "ValueRoute": "attention-route strategy",
    "PatternRoute": "attention-route strategy", "RAPass": "ra_pass internals (reversed_attention builds results)", "RAContext": "base of ReversedAttention / RANorms (no instances)",
    "Unsupported": "attention-route strategy (a refusal reason)",
    "HookRef": "HookedTransformer adapter internals (a hook name)",
    "LinearHooks": "HookedTransformer adapter internals (a weight's two hook names)",
}


@pytest.fixture(scope="module")
def results() -> dict[str, object]:
    """One instance of every result type, from the embedded model."""
    model = tlb.load_model()
    ad = get_adapter(model)
    nll = tlb.metrics.target_nll(" paris")
    out: dict[str, object] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TL warns when norm internals are hooked (names=None)
        out["GradientCache"] = tlb.capture(model, PROMPT, nll)
    ra = tlb.reversed_attention(model, PROMPT, " paris")
    out["ReversedAttention"] = ra
    out["RANorms"] = tlb.reversed_attention(model, PROMPT, " paris", keep="norms")
    out["RATopK"] = tlb.reversed_attention(model, PROMPT, " paris", keep="topk", top_k=4)
    out["HeadRanking"] = tlb.rank_heads(model, [PROMPT, "the capital of spain is"], [" paris", " madrid"], progress=False)
    gf = tlb.gradient_factors(model, PROMPT, " rome", modules="all")
    out["GradientFactors"], out["Factor"], out["Factor/attention"] = gf, gf[3, "mlp_out"], gf[1, "q"]
    out["FactorNorms"], out["FactorSVD"] = gf[3, "mlp_out"].norms(), gf[1, "q"].svd()
    lens = tlb.backward_lens(model, PROMPT, " rome")
    out["BackwardLens"], out["LensReadout"], out["ImprintShift"] = lens, lens["mlp_out"], lens.imprint_shift(-1, 1.0)
    x = torch.randn(3, ad.d_model, generator=torch.Generator().manual_seed(0))
    out["VocabReadout"] = vocab_readout(ad.ln_final(x), ad.W_U, ad.b_U, k=5, rank_ids=torch.zeros(3, 1, dtype=torch.long))
    out["Projection"] = project(ad, x, 5)
    out["Unembed"] = ad.unembedding
    out["Readout"] = ad.unembedding.readout(x, k=5, targets=5, softmax=True)
    with tlb.forward_pass_shift(model, PROMPT, " rome", layer=1, eta=3.2) as edit:
        out["Edit"] = edit
    out["EditEvaluation"] = tlb.evaluate_edits(model, World(0).edit_requests(3, seed=0), layer=1, eta=3.2, progress=False)
    graph = tlb.flow_graph(model, PROMPT, layer=1, target=" paris")
    out["FlowGraph"], out["Node"], out["Edge"] = graph, graph.nodes[-1], graph.edges[0]
    prompts = [PROMPT, "the capital of spain is"]
    out["LNFilter"] = ln_filter(model, prompts, layer=1)
    reg = regularisation_neurons(model, prompts, layers=1, min_fraction=0.5, top=3, baseline=8)
    out["RegularisationNeurons"], out["RegNeuron"] = reg, reg.candidates[0]
    qa = world_task(4)
    segments = qa_segments(model, qa)
    out["QA"], out["Segments"] = qa[0], segments
    out["Generation"] = tlb.mas_generate(model, segments, max_new_tokens=3)
    with preserving_weights(model):
        out["FinetuneResult"] = tlb.mas_finetune(model, segments, epochs=1, batch_size=2, progress=False)
    report = build_report(model, PROMPT, target=" paris")
    out["Report"], out["Prediction"], out["Page"] = report, report.predictions[0], report.page
    out["Figure"] = report.page.figures[0]
    out["Streamed"] = stream(model, PROMPT, nll)
    out["Batch"] = ad.tokenize(PROMPT)
    out["SweepResult"] = run_sweep(range(3), lambda k: ({"s": torch.ones(2)}, 1, [k]), fingerprint="repr")
    out.update(_experiments(model))
    return out


def _experiments(model) -> dict[str, object]:
    """The four experiments' result types, from the smallest runs that fill them."""
    train, test = world_pairs("country_capital")
    icl = icl_patching(model, train, test[:4], n_shots=(0,), etas=(-10.0,), n_train=2, verbose=False)
    pert = icl_perturbation(model, train, test[:4], n_shots=(0,), n_train=2, fractions=(0.0, 1.0),
                            rankings=("reversed",), verbose=False)
    edits = editing_run(model, World(0).edit_requests(3, seed=0), n_tune=1, layers=[1], etas=(3.2,), progress=False)
    mas = mas_comparison(model, n_train=4, n_test=4, batch_size=4, seeds=(0,), progress=False, verbose=False)
    return {"ICLPatching": icl, "ICLRow": icl.rows[-1], "ICLPerturbation": pert, "HeadPerturbation": pert[0],
            "PerturbationRow": pert[0].rows[0], "EditingRun": edits, "GridPoint": edits.grid[0],
            "EditScores": edits.edited, "MASComparison": mas, "ArmResult": mas.arms["mas"]}


def test_every_result_repr_is_one_short_line(results):
    for label, obj in results.items():
        text = repr(obj)
        assert text.startswith(type(obj).__name__ + "("), (label, text)
        assert "\n" not in text and len(text) < MAX_CHARS, (label, len(text), text[:300])
        assert "tensor(" not in text, (label, text)


def test_every_result_type_is_covered(results):
    """A new dataclass in the package must get a short repr here, or a reason in NOT_RESULTS."""
    covered = {type(obj).__name__ for obj in results.values()}
    found = set()
    for info in pkgutil.walk_packages(tlb.__path__, "tl_backward."):
        module = importlib.import_module(info.name)
        found |= {name for name, obj in vars(module).items()
                  if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == info.name}
    assert found - covered - set(NOT_RESULTS) == set()


def test_reprs_carry_the_headline_figures(results):
    cache, lens, edit = results["GradientCache"], results["BackwardLens"], results["Edit"]
    B, T = cache.tokens.shape
    assert repr(cache) == f"GradientCache({len(cache)} hooks, batch {B} × {T} tokens, metric {float(cache.metric):.4g})"
    assert "'rome'" in repr(lens) and f"{len(lens.layers)} layers" in repr(lens)
    assert repr(edit).endswith("undone)") and not edit.active  # the with-block undid it
    ev = results["EditEvaluation"]
    assert f"{100 * ev.summary()['efficacy']:.1f}%" in repr(ev)
    f = results["Factor"]
    assert str(list(f.reconstruct().shape)) in repr(f)


def test_experiment_reprs_carry_their_numbers(results):
    icl, mas, edits = results["ICLPatching"], results["MASComparison"], results["EditingRun"]
    row = results["ICLRow"]
    assert f"{row.top1:.1f}/{row.top2:.1f}/{row.top3:.1f} %" in repr(row) and f"{icl.n_test} test queries" in repr(icl)
    assert f"MAS {100 * mas.arms['mas'].mean:.1f} %" in repr(mas) and f"{100 * mas.delta_mas_minus_causal:+.1f}" in repr(mas)
    assert f"layer {edits.chosen.layer}, η {edits.chosen.eta:g}" in repr(edits)
    assert f"efficacy {100 * edits.edited.efficacy:.1f}%" in repr(edits)
    pert = results["HeadPerturbation"]
    assert f"{pert.n_heads} heads" in repr(pert) and f"{pert.rows[0].top1:.1f}" in repr(pert.rows[0])
