"""mean_over, ICL patching and head perturbation on the dataset sweep (core/sweep.py): streamed
examples, resume after a crash, and torchrun sharding.

Independent references: the list-based call (streamed examples must give the same result), the
same run uninterrupted in one process (resume and torchrun must reproduce it), and for the
cross-rank crop of align="end" the element-wise mean of single-prompt maps.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.core.sweep_worker import ICL_PAIRS, PROMPTS, SAME_LENGTH
from tests.tolerance import MODEL_TERMS, assert_close_fp32
from tl_backward.attention import aggregate, icl, mean_over, perturbation, reversed_attention
from tl_backward.attention.icl import evaluate, icl_patching, icl_prompts
from tl_backward.attention.perturbation import icl_perturbation
from tl_backward.core.adapter import get_adapter

ROOT = Path(__file__).resolve().parents[2]
TRAIN, TEST = ICL_PAIRS[:14], ICL_PAIRS[14:]
FIELDS = ("maps", "patterns", "metric", "tokens", "mask", "last")


def same(a, b):
    """Two mean results equal to the bit, metadata included."""
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in FIELDS)
    assert (a.str_tokens, a.layers, a.scales, a.n_examples, a.align) == (b.str_tokens, b.layers, b.scales,
                                                                         b.n_examples, b.align)


@pytest.mark.parametrize("align, data", [("exact", SAME_LENGTH), ("end", PROMPTS[:7])])
def test_mean_over_streamed_equals_the_list_call(gpt2_model, align, data):
    prompts, targets = [p for p, _ in data], [t for _, t in data]
    ref = mean_over(gpt2_model, prompts, targets, align=align, batch_size=2, prepend_bos=True)
    pairs = mean_over(gpt2_model, iter(data), align=align, batch_size=2, prepend_bos=True)
    dicts = mean_over(gpt2_model, ({"prompt": p, "target": t} for p, t in data), align=align, batch_size=2,
                      prepend_bos=True)
    same(pairs, ref)
    same(dicts, ref)
    assert ref.n_examples == len(data)
    if align == "end":  # against single-prompt maps cropped to the shortest prompt's last n positions
        singles = [reversed_attention(gpt2_model, p, t, prepend_bos=True) for p, t in data]
        n = min(s.maps.shape[-1] for s in singles)
        manual = torch.stack([s.maps[:, 0, :, -n:, -n:] for s in singles]).mean(0)
        assert ref.maps.shape[-1] == n and ref.str_tokens[0] == singles[0].str_tokens[0][-n:]
        assert_close_fp32(ref.maps[:, 0], manual, n_terms=MODEL_TERMS, what="mean maps")


def test_mean_over_exact_refuses_lengths_that_differ_across_batches(gpt2_model):
    with pytest.raises(ValueError, match="align='end'"):
        mean_over(gpt2_model, ["the cat sat", "the dog ran to"], " big", batch_size=1, prepend_bos=True)


def test_mean_over_resumes_after_a_crash(gpt2_model, tmp_path, monkeypatch):
    data = PROMPTS[:7]
    ref = mean_over(gpt2_model, iter(data), align="end", batch_size=2, prepend_bos=True)

    def failing():
        yield from data[:5]  # batches 0 and 1 complete; the crash comes while batch 2 is drawn
        raise OSError("the dataset's disk went away")

    ck = tmp_path / "mean.pt"
    with pytest.raises(OSError):
        mean_over(gpt2_model, failing(), align="end", batch_size=2, prepend_bos=True, checkpoint=ck)
    assert torch.load(ck, weights_only=True)["drawn"] == 2
    calls = []
    real = aggregate.ra_pass
    monkeypatch.setattr(aggregate, "ra_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = mean_over(gpt2_model, iter(data), align="end", batch_size=2, prepend_bos=True, checkpoint=ck)
    assert len(calls) == 2  # batches 2 and 3 only: nothing summed before the crash runs again
    same(resumed, ref)  # the first example's tokens come from the checkpoint, cropped to the final n
    with pytest.raises(ValueError, match="another run"):
        mean_over(gpt2_model, iter(data), align="end", batch_size=3, prepend_bos=True, checkpoint=ck)


def test_evaluate_streams_and_resumes(gpt2_model, tmp_path):
    prompts = [p for p, _ in icl_prompts(TRAIN, TEST, 1, seed=1)]
    answers = [int(gpt2_model.tokenizer.convert_tokens_to_ids(y)) for _, y in TEST]
    ref_hits, ref_nll = evaluate(gpt2_model, prompts, answers, ks=(1, 10, 30), batch_size=4)
    # an independent recomputation, one prompt at a time
    for i, (p, a) in enumerate(zip(prompts, answers)):
        with torch.no_grad():
            tokens = get_adapter(gpt2_model).tokenize(p, prepend_bos=True).tokens
            logits = gpt2_model(tokens, return_type="logits")[0, -1].float()
        rank = int((logits > logits[a]).sum())
        assert ref_hits[i].tolist() == [rank < 1, rank < 10, rank < 30]
        assert float(ref_nll[i]) == pytest.approx(float(-torch.log_softmax(logits, -1)[a]), rel=1e-5)
    hits, nll = evaluate(gpt2_model, (p for p in prompts), iter(answers), ks=(1, 10, 30), batch_size=4)
    assert torch.equal(hits, ref_hits) and torch.equal(nll, ref_nll)

    def failing():
        yield from prompts[:5]
        raise OSError("gone")

    ck = tmp_path / "eval.pt"
    with pytest.raises(OSError):
        evaluate(gpt2_model, failing(), answers, ks=(1, 10, 30), batch_size=4, checkpoint=ck)
    hits, nll = evaluate(gpt2_model, prompts, answers, ks=(1, 10, 30), batch_size=4, checkpoint=ck)
    assert torch.equal(hits, ref_hits) and torch.equal(nll, ref_nll)
    with pytest.raises(ValueError, match="answers"):
        evaluate(gpt2_model, prompts, answers[:-1])


def _crash_on(module, name, monkeypatch, at):
    """Make ``module.name`` (a context manager) raise on its ``at``-th use; count every use."""
    real, uses = getattr(module, name), []

    def wrapped(*args, **kwargs):
        uses.append(1)
        if len(uses) == at:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return uses


def test_icl_patching_resumes_after_a_crash(gpt2_model, tmp_path, monkeypatch):
    kw = dict(n_shots=(0, 1), etas=(-30.0, 2.0), n_train=5, batch_size=2, verbose=False)
    ref = icl_patching(gpt2_model, TRAIN, TEST, **kw)
    ck = tmp_path / "icl.pt"
    _crash_on(icl, "patch_attention", monkeypatch, at=6)  # in the 1-shot run, after its mean and "none" row
    with pytest.raises(KeyboardInterrupt):
        icl_patching(gpt2_model, TRAIN, TEST, **kw, checkpoint=ck)
    monkeypatch.undo()
    done = sorted(p.name for p in tmp_path.iterdir())
    assert "icl.pt.0shot.mean" in done and "icl.pt.1shot.none" in done and "icl.pt.1shot.reversed.-30" in done
    assert "icl.pt.1shot.forward.-30" not in done
    calls = []
    real = aggregate.ra_pass
    monkeypatch.setattr(aggregate, "ra_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = icl_patching(gpt2_model, TRAIN, TEST, **kw, checkpoint=ck)
    assert not calls  # both means come from their checkpoints
    assert resumed == ref and resumed.rows == ref.rows


def test_icl_perturbation_resumes_after_a_crash(gpt2_model, tmp_path, monkeypatch):
    kw = dict(n_shots=(1,), n_train=4, fractions=(0.0, 0.5, 1.0), rankings=("reversed", "random"), batch_size=2,
              verbose=False)
    ref = icl_perturbation(gpt2_model, TRAIN, TEST, **kw)
    ck = tmp_path / "pert.pt"
    _crash_on(perturbation, "zero_heads", monkeypatch, at=5)
    with pytest.raises(KeyboardInterrupt):
        icl_perturbation(gpt2_model, TRAIN, TEST, **kw, checkpoint=ck)
    monkeypatch.undo()
    uses = _crash_on(perturbation, "zero_heads", monkeypatch, at=0)
    resumed = icl_perturbation(gpt2_model, TRAIN, TEST, **kw, checkpoint=ck)
    assert len(uses) == 3 * 3  # every context entered again; the four scorings done are read back
    assert resumed[1].rows == ref[1].rows
    assert torch.equal(resumed[1].ranking.reversed_mean, ref[1].ranking.reversed_mean)


def _run(out, job, torchrun=False):
    cmd = [sys.executable, "-m", "tests.core.sweep_worker", str(out), "--job", job]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *cmd[1:]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    return [torch.load(f"{out}.rank{r}") for r in range(2 if torchrun else 1)]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.processes
def test_mean_over_under_torchrun_equals_one_process(tmp_path):
    """Both align modes; under "end" the ranks' shortest prompts differ (2 vs 4 words), so the
    cross-rank fold has to crop rank 1's sums to rank 0's length."""
    (single,) = _run(tmp_path / "single", "means")
    ranks = _run(tmp_path / "dist", "means", torchrun=True)
    for align in ("exact", "end"):
        s = single[align]
        for r in (ranks[0][align], ranks[1][align]):
            assert r["n"] == s["n"] and r["maps"].shape == s["maps"].shape
            for key in ("maps", "patterns", "metric"):
                assert rel(r[key], s[key]) <= 1e-6, (align, key)  # float64 sums in another order, stored fp32
            assert torch.equal(r["tokens"], s["tokens"])
            assert (r["str_tokens"], r["layers"], r["scales"]) == (s["str_tokens"], s["layers"], s["scales"])
        assert torch.equal(ranks[0][align]["maps"], ranks[1][align]["maps"])  # every rank folds the same list
    assert single["end"]["maps"].shape[-1] == 3  # BOS + "red blue": the crop happened


@pytest.mark.processes
def test_icl_and_perturbation_under_torchrun_equal_one_process(tmp_path):
    (single,) = _run(tmp_path / "single", "icl")
    for r in _run(tmp_path / "dist", "icl", torchrun=True):
        assert torch.equal(r["hits"], single["hits"]) and torch.equal(r["nll"], single["nll"])  # same batches
        assert r["perturbation_rows"] == single["perturbation_rows"]
        assert rel(r["ranking"], single["ranking"]) <= 1e-6
        for mine, ref in zip(r["icl_rows"], single["icl_rows"], strict=True):
            assert {k: v for k, v in mine.items() if k != "nll"} == {k: v for k, v in ref.items() if k != "nll"}
            assert mine["nll"] == pytest.approx(ref["nll"], rel=1e-6)  # patched with maps summed in another order
        assert r["fit_loss"].keys() == single["fit_loss"].keys()
        assert all(r["fit_loss"][k] == pytest.approx(v, rel=1e-6) for k, v in single["fit_loss"].items())
