"""The FPS editing experiment (tl_backward.lens.experiment) on a tiny model and toy requests."""

import dataclasses
import json

import pytest
import torch

from tl_backward.lens.experiment import EditingRun, EditScores, GridPoint, format_report, harmonic_score, run
from tl_backward.lens.evaluation import evaluate_edits

REQUESTS = [
    dict(prompt="the capital of france is", target_new="rome", target_true="paris",
         paraphrases=["france has the capital"], neighborhood=["the capital of italy is"]),
    dict(prompt="the cat sat on the", target_new="dog", target_true="mat",
         paraphrases=["a cat sat on the"], neighborhood=["the dog sat on the"]),
    dict(prompt="the dog ran to the", target_new="city", target_true="mat",
         paraphrases=["a dog ran to the"], neighborhood=["the cat ran to the"]),
]


def test_harmonic_score():
    assert harmonic_score(dict(efficacy=1.0, paraphrase=0.5, neighborhood=0.5)) == pytest.approx(0.6)
    assert harmonic_score(dict(efficacy=1.0, paraphrase=0.0, neighborhood=1.0)) == 0.0


def test_run_tunes_then_scores_held_out(gpt2_model, capsys):
    snap = [p.detach().clone() for p in gpt2_model.parameters()]
    out = run(gpt2_model, REQUESTS, n_tune=1, layers=[0, 1], etas=(1.0, 100.0), progress=False)
    assert isinstance(out, EditingRun) and all(isinstance(g, GridPoint) for g in out.grid)
    assert len(out.grid) == 4 and out.n_tune == 1 and out.n_eval == 2
    assert [(g.layer, g.eta) for g in out.grid] == [(0, 1.0), (0, 100.0), (1, 1.0), (1, 100.0)]
    # every grid point is evaluate_edits on the tuning request
    for g in out.grid:
        s = evaluate_edits(gpt2_model, REQUESTS[:1], layer=g.layer, eta=g.eta, progress=False).summary()
        assert (g.efficacy, g.paraphrase, g.neighborhood) == (s["efficacy"], s["paraphrase"], s["neighborhood"])
        assert g.score == harmonic_score(s)
    best = max(out.grid, key=lambda g: (g.score, g.efficacy, -g.eta))
    assert out.chosen == best and (out["chosen"]["layer"], out["chosen"]["eta"]) == (best.layer, best.eta)
    # the held-out numbers are exactly evaluate_edits on the held-out requests
    again = evaluate_edits(gpt2_model, REQUESTS[1:], layer=best.layer, eta=best.eta, progress=False).summary()
    assert isinstance(out.edited, EditScores)
    assert dict(out.edited) == dict(again, score=harmonic_score(again))
    plain = evaluate_edits(gpt2_model, REQUESTS[1:], progress=False).summary()
    assert dict(out.baseline) == dict(plain, score=harmonic_score(plain)) and out.baseline.applied == 0
    assert all(torch.equal(a, b) for a, b in zip(gpt2_model.parameters(), snap))
    printed = capsys.readouterr().out
    assert "FPS tuning grid" in printed and "unedited" in printed
    assert format_report(out) == out.table() and out.table() in printed
    # frozen; dict-style reads; to_dict and the frame carry the same numbers
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.chosen = out.grid[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.edited.efficacy = 1.0
    assert out["edited"]["efficacy"] == out.edited.efficacy and out["grid"][0]["score"] == out.grid[0].score
    d = json.loads(json.dumps(out.to_dict()))
    assert d["grid"] == [dataclasses.asdict(g) for g in out.grid] and d["baseline"] == dataclasses.asdict(out.baseline)
    assert d["chosen"] == dataclasses.asdict(best) and d["seconds"] == out.seconds
    assert out.to_frame()["score"].tolist() == [g.score for g in out.grid]
    assert all("\n" not in repr(x) for x in (out, out.grid[0], out.edited))


def test_run_restores_threads(gpt2_model):
    before = torch.get_num_threads()
    run(gpt2_model, REQUESTS, n_tune=1, layers=[1], etas=(1.0,), progress=False, threads=1)
    assert torch.get_num_threads() == before


def test_run_bad_input(gpt2_model):
    with pytest.raises(ValueError, match="n_tune must be"):
        run(gpt2_model, REQUESTS, n_tune=3, progress=False)
    with pytest.raises(ValueError, match="out of range"):
        run(gpt2_model, REQUESTS, n_tune=1, layers=[4], progress=False)
    with pytest.raises(ValueError, match="etas is empty"):
        run(gpt2_model, REQUESTS, n_tune=1, etas=(), progress=False)
