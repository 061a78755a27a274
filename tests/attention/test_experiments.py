"""ICL attention patching and head perturbation as code, on tiny random models (accuracies are
meaningless there; these tests check the procedure against direct recomputation)."""

import dataclasses
import json

import pytest
import torch

from tests.reference import assert_no_hooks, assert_untouched
from tests.tolerance import MODEL_TERMS, fp32_rtol
from tl_backward.attention import mean_over, patch_attention, rank_heads, zero_heads
from tl_backward.core.adapter import get_adapter
from tl_backward.attention.icl import (ICLPatching, ICLRow, answer_ids, constant_length_pairs, evaluate,
                                       format_icl_table, icl_patching, icl_prompt, icl_prompts, to_frame, topk_hits)
from tl_backward.attention.perturbation import (PAPER_FRACTIONS, HeadPerturbation, ICLPerturbation, PerturbationRow,
                                               format_perturbation_table, head_perturbation, icl_perturbation)
from tl_backward.errors import TLBackwardError

WORDS = [("hot", "cold"), ("big", "small"), ("good", "bad"), ("up", "down"), ("yes", "no"),
         ("one", "two"), ("three", "four"), ("five", "six"), ("seven", "eight"), ("nine", "ten")]
PAIRS = WORDS + [(b, a) for a, b in WORDS]
TRAIN, TEST = PAIRS[:14], PAIRS[14:]


def test_prompt_template_and_seeded_demonstrations():
    assert icl_prompt([("hot", "cold")], "big") == "Q: hot\nA: cold\n\nQ: big\nA:"
    a = icl_prompts(TRAIN, TEST, 3, seed=0)
    assert a == icl_prompts(TRAIN, TEST, 3, seed=0) and a != icl_prompts(TRAIN, TEST, 3, seed=1)
    for (prompt, target), (x, y) in zip(a, TEST):
        assert target == " " + y and prompt.endswith(f"Q: {x}\nA:")
        assert prompt.count("Q: ") == 4 and f"Q: {x}\nA: " not in prompt  # the query is never a demo
    with pytest.raises(ValueError, match="demonstrations"):
        icl_prompts(TRAIN[:2], TEST, 5)


def test_topk_hits_reads_each_rows_last_token(gpt2_model):
    prompts = ["the cat sat on the mat", "the dog", "a big red dog is"]
    answers = [5, 9, 11]
    hits = topk_hits(gpt2_model, prompts, answers, ks=(1, 3), batch_size=2)
    ad = get_adapter(gpt2_model)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            logits = gpt2_model(ad.tokenize(p, prepend_bos=True).tokens, return_type="logits")[0, -1]
        top = logits.topk(3).indices.tolist()
        assert bool(hits[i, 0]) == (top[0] == answers[i]) and bool(hits[i, 1]) == (answers[i] in top)
    # the model's own argmax is always a top-1 hit
    preds = []
    for p in prompts:
        with torch.no_grad():
            preds.append(int(gpt2_model(ad.tokenize(p, prepend_bos=True).tokens, return_type="logits")[0, -1].argmax()))
    assert bool(topk_hits(gpt2_model, prompts, preds, ks=(1,), batch_size=3).all())


def test_icl_patching_rows_match_direct_recomputation(gpt2_model):
    res = icl_patching(gpt2_model, TRAIN, TEST, n_shots=(0, 2), etas=(0, -30.0, 2.0), n_train=6,
                       batch_size=4, verbose=False)
    assert isinstance(res, ICLPatching) and all(isinstance(r, ICLRow) for r in res.rows)
    rows = res.rows
    assert isinstance(rows, tuple) and len(rows) == 2 * (1 + 2 * 2)
    assert {(r.n_shots, r.method) for r in rows} == {(k, m) for k in (0, 2) for m in ("none", "reversed", "forward")}
    for r in rows:
        assert 0 <= r.top1 <= r.top2 <= r.top3 <= 100 and r.n_test == len(TEST)
    assert {r.prompt_len for r in rows if r.n_shots == 2} == {1 + 6 * 2 + 5}  # BOS + 2 demos (Q : x A : y) + query (Q : x A :)
    assert (res.n_train, res.n_test, res.seed, res.fit_source) == (6, len(TEST), 0, "train")
    # recompute the 2-shot RA row at η = -30 by hand
    fit = icl_prompts(TRAIN, TRAIN[:6], 2, seed=0)
    evals = icl_prompts(TRAIN, TEST, 2, seed=1)
    mean = mean_over(gpt2_model, [p for p, _ in fit], answer_ids(gpt2_model, [t for _, t in fit]), prepend_bos=True)
    ans = answer_ids(gpt2_model, [t for _, t in evals])
    with patch_attention(gpt2_model, mean, eta=-30.0):
        hits = topk_hits(gpt2_model, [p for p, _ in evals], ans)
    row = res.row(2, "reversed", -30.0)
    assert row is next(r for r in rows if r.n_shots == 2 and r.method == "reversed" and r.eta == -30.0)
    assert row.top1 == pytest.approx(100 * float(hits[:, 0].float().mean()))  # hit rates: counts / n
    assert row.top3 == pytest.approx(100 * float(hits[:, 2].float().mean()))
    none = res.row(2, "none")
    plain = topk_hits(gpt2_model, [p for p, _ in evals], ans)
    assert none.top1 == pytest.approx(100 * float(plain[:, 0].float().mean()))
    ad = get_adapter(gpt2_model)
    with torch.no_grad():
        logits = gpt2_model(ad.tokenize([p for p, _ in evals], prepend_bos=True).tokens, return_type="logits")[:, -1]
    nll = -torch.log_softmax(logits, -1)[torch.arange(len(ans)), torch.tensor(ans)].mean()
    # losses from other batchings of the same prompts: whole-model fp32 spread
    assert none.nll == pytest.approx(float(nll), rel=fp32_rtol(MODEL_TERMS))
    assert res.fit_loss[2] == pytest.approx(float(mean.metric), rel=fp32_rtol(MODEL_TERMS))
    assert_no_hooks(gpt2_model)
    assert_untouched(gpt2_model)
    _check_icl_patching_result(res)


def _check_icl_patching_result(res):
    """Frozen, dict-style reads, table, frame and to_dict all carry the computed rows."""
    row = res.rows[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.rows = ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.top1 = 100.0
    with pytest.raises(TypeError):
        res.fit_loss[0] = 0.0  # FrozenDict: no item assignment
    assert res["rows"] is res.rows and res["fit_loss"][2] == res.fit_loss[2] and row["top1"] == row.top1
    assert "\n" not in repr(res) and repr(row).startswith("ICLRow(")
    table = res.table()
    assert format_icl_table(res) == table
    for r in res.rows:
        assert f"{r.top1:.1f} / {r.top2:.1f} / {r.top3:.1f} ({r.nll:.3f})" in table
    d = json.loads(json.dumps(res.to_dict()))
    assert d["rows"] == [dataclasses.asdict(r) for r in res.rows]
    assert d["fit_loss"] == {str(k): v for k, v in res.fit_loss.items()} and d["model"] == res.model
    frame = to_frame(res)
    assert list(frame.columns) == [f.name for f in dataclasses.fields(ICLRow)]
    assert frame["top1"].tolist() == [r.top1 for r in res.rows] and frame["method"].tolist() == [r.method for r in res.rows]
    with pytest.raises(TLBackwardError, match="eta=7.0 was not run"):
        res.row(2, "reversed", 7.0)


def test_icl_patching_enforces_constant_length(gpt2_model):
    mixed = TRAIN + [("the cat", "dog")]
    with pytest.raises(ValueError, match="constant_length_pairs"):
        icl_patching(gpt2_model, mixed[-3:] + TRAIN[:3], TEST, n_shots=(1,), etas=(-1,), verbose=False)
    kept = constant_length_pairs(gpt2_model, mixed + [("big", "red dog")])
    assert kept == TRAIN  # the two-word input and the two-token answer are dropped


def test_head_perturbation_against_direct_ablation(llama_model):
    fit = icl_prompts(TRAIN, TRAIN[:6], 1, seed=0)
    evals = icl_prompts(TRAIN, TEST, 1, seed=1)
    ranking = rank_heads(llama_model, [p for p, _ in fit], answer_ids(llama_model, [t for _, t in fit]),
                         prepend_bos=True, progress=False)
    res = head_perturbation(llama_model, [p for p, _ in fit], [t for _, t in fit], [p for p, _ in evals],
                            [t for _, t in evals], fractions=(0.0, 0.5, 1.0), ranking=ranking, verbose=False)
    assert isinstance(res, HeadPerturbation) and all(isinstance(r, PerturbationRow) for r in res.rows)
    names = {r.ranking for r in res.rows}
    assert names == {"reversed", "reversed_asc", "forward", "forward_asc", "random"}
    assert res.n_heads == 8 and res.ranking is ranking and (res.n_train, res.n_test) == (len(fit), len(evals))
    ans = answer_ids(llama_model, [t for _, t in evals])
    prompts = [p for p, _ in evals]
    full = topk_hits(llama_model, prompts, ans)
    with zero_heads(llama_model, [(l, h) for l in range(2) for h in range(4)]):
        none = topk_hits(llama_model, prompts, ans)
    with zero_heads(llama_model, ranking.order("reversed")[4:]):
        half = topk_hits(llama_model, prompts, ans)
    pct = lambda h, j: 100 * float(h[:, j].float().mean())  # noqa: E731
    for r in res.rows:
        expect = {0.0: none, 1.0: full}.get(r.fraction)
        if expect is not None:
            assert [r.top1, r.top2, r.top3] == pytest.approx([pct(expect, j) for j in range(3)])
        assert r.n_kept == round(r.fraction * 8)
    row = res.row("reversed", 0.5)
    assert row.top1 == pytest.approx(pct(half, 0))
    assert_no_hooks(llama_model)
    # frozen; dict-style reads; table, frame and to_dict carry the same rows
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.n_heads = 9
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.top1 = 0.0
    assert res["rows"][0]["ranking"] == res.rows[0].ranking and "\n" not in repr(res)
    table = format_perturbation_table(res)
    assert table == res.table()
    assert f"| 50% ({row.n_kept}) | " + " | ".join(f"{res.row(n, 0.5).top1:.1f}" for n in
                                               dict.fromkeys(r.ranking for r in res.rows)) + " |" in table
    assert res.to_frame()["top1"].tolist() == [r.top1 for r in res.rows]
    d = json.loads(json.dumps(res.to_dict()))
    assert d["rows"] == [dataclasses.asdict(r) for r in res.rows]
    assert d["ranking"]["reversed_mean"] == ranking.reversed_mean.tolist()  # JSON round-trips floats exactly


def test_icl_perturbation_runs_per_shot(gpt2_model):
    out = icl_perturbation(gpt2_model, TRAIN, TEST, n_shots=(0, 1), n_train=4, fractions=(0.0, 1.0),
                           rankings=("reversed",), include_reversed=False, verbose=False)
    assert isinstance(out, ICLPerturbation) and sorted(out) == [0, 1] and out.n_shots == (0, 1)
    assert all(isinstance(r, HeadPerturbation) and len(r.rows) == 2 for r in out.values())
    assert out[1] is out.runs[1] and dict(out.items()) == {0: out.runs[0], 1: out.runs[1]}
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.runs = ()
    frame = out.to_frame()
    assert frame["n_shots"].tolist() == [0, 0, 1, 1]
    assert frame["top1"].tolist() == [r.top1 for run in out.runs for r in run.rows]
    assert out.table() == f"== 0-shot ==\n{out[0].table()}\n\n== 1-shot ==\n{out[1].table()}"
    assert PAPER_FRACTIONS[0] == 0.0 and PAPER_FRACTIONS[-1] == 1.0 and len(PAPER_FRACTIONS) == 11
    with pytest.raises(ValueError, match="fractions"):
        head_perturbation(gpt2_model, ["the cat"], [" dog"], ["the cat"], [" dog"], fractions=(1.5,), verbose=False)
    with pytest.raises(ValueError, match="rankings"):
        head_perturbation(gpt2_model, ["the cat"], [" dog"], ["the cat"], [" dog"], rankings=("loss",), verbose=False)


def test_fit_queries_replace_the_training_queries(gpt2_model):
    """With fit_queries, RĀ is the mean over those queries' prompts (demonstrations still from train)."""
    fitq = TEST[:3]
    res = icl_patching(gpt2_model, TRAIN, TEST[3:], n_shots=(1,), etas=(-40.0,), n_train=3, fit_queries=fitq,
                       batch_size=4, verbose=False)
    fit = icl_prompts(TRAIN, fitq, 1, seed=0)
    mean = mean_over(gpt2_model, [p for p, _ in fit], answer_ids(gpt2_model, [t for _, t in fit]), prepend_bos=True)
    assert res.fit_loss[1] == pytest.approx(float(mean.metric), rel=fp32_rtol(MODEL_TERMS))
    assert res.fit_source == "fit_queries"
    default = icl_patching(gpt2_model, TRAIN, TEST[3:], n_shots=(1,), etas=(-40.0,), n_train=3, verbose=False)
    # other fit prompts: differs by more than fp32 noise (measured ~5e-4 relative)
    assert default.fit_loss[1] != pytest.approx(res.fit_loss[1], rel=fp32_rtol(MODEL_TERMS))
    evals = icl_prompts(TRAIN, TEST[3:], 1, seed=1)
    ans = answer_ids(gpt2_model, [t for _, t in evals])
    with patch_attention(gpt2_model, mean, eta=-40.0):
        _, nll = evaluate(gpt2_model, [p for p, _ in evals], ans)
    row = res.row(1, "reversed", -40.0)
    assert row.nll == pytest.approx(float(nll.mean()), rel=fp32_rtol(MODEL_TERMS))
    with pytest.raises(ValueError, match="fit_queries is empty"):
        icl_patching(gpt2_model, TRAIN, TEST, n_shots=(1,), fit_queries=[], verbose=False)
    out = icl_perturbation(gpt2_model, TRAIN, TEST[3:], n_shots=(1,), fit_queries=fitq, fractions=(1.0,),
                           rankings=("reversed",), include_reversed=False, verbose=False)
    assert out[1].n_train == 3
