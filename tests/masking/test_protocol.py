"""The MAS paper's protocol (masking/protocol.py, protocol_report.py, choice.py) in a smoke
configuration on the embedded facts-gpt2: the multiple-choice task, finetune's on_step callback,
the pairing (same data order in both masks, checked against an independent permutation), the
per-run JSON / resume, the summary's statistics and the written markdown / JSON / curve."""

import json
import math

import pytest
import torch

from tests.reference import assert_no_hooks, assert_untouched
from tests.tolerance import fp32_rtol
from tl_backward import load_model
from tl_backward.masking import answer_loss, finetune, preserving_weights
from tl_backward.masking.choice import LABELS, SYSTEM, choice_facts, choice_task
from tl_backward.masking.experiment import answer_accuracy, qa_segments, synthetic_task
from tl_backward.masking.protocol import (
    ARMS,
    PAPER_LORA,
    TASKS,
    answer_metrics,
    main,
    order_digest,
    protocol_config,
    run_group,
)
from tl_backward.masking.protocol_report import check_pairing, collect
from tl_backward.masking.stats import paired_summary
from tl_backward.zoo.world import World

TINY = dict(n_train=12, n_dev=8, n_test=8, batch_size=4, eval_every=2, epochs=2, patience=1)


@pytest.fixture(scope="module")
def facts():
    return load_model("facts-gpt2")


def reference_digests(n, batch_size, epochs, seed):
    """finetune's batch order written out independently: one seeded randperm per epoch."""
    gen = torch.Generator().manual_seed(seed)
    return [order_digest(torch.randperm(n, generator=gen).tolist()) for _ in range(epochs)]


# --- the multiple-choice task -----------------------------------------------------------------
def test_choice_task_is_one_token_answerable_and_split(facts):
    world, vocab = World(0), facts.tokenizer.get_vocab()
    splits = {s: choice_facts(world, s) for s in ("train", "dev", "test")}
    keys = {s: {(r, sub) for r, sub, _ in f} for s, f in splits.items()}
    assert not keys["train"] & keys["test"] and not keys["dev"] & keys["test"] and not keys["train"] & keys["dev"]
    anton = {tuple(sorted((s, o))) for r, s, o in splits["test"] if r == "antonym"}
    assert not any(tuple(sorted((s, o))) in anton for r, s, o in splits["train"] if r == "antonym")
    assert "parity" not in {r for r, _, _ in splits["train"]} and len(splits["test"]) > 100
    exs = choice_task(60, split="test")
    assert exs == choice_task(60, split="test") and exs != choice_task(60, split="test", seed=1)
    for ex in exs:
        assert all(w in vocab for w in ex.prompt.split()), ex.prompt  # no <unk> in the fixed vocabulary
        assert ex.prompt.startswith(SYSTEM) and ex.answer in LABELS
        user = ex.prompt.split("###")[1]
        listed, question = user.split(" question : ")
        words = listed.split()  # "user : 1 : x 2 : y ..."
        opts = words[4::3]
        assert words[:2] == ["user", ":"] and words[2::3] == list(LABELS) and len(set(opts)) == 4
        subject = question.split(" of ")[1].split(" is ?")[0]
        rel = next(r for r, s, o in splits["test"] if s == subject and o == opts[LABELS.index(ex.answer)])
        assert world.facts[rel][subject] == opts[LABELS.index(ex.answer)]
    seg = qa_segments(facts, exs[:4])
    assert seg.n_blocks.tolist() == [2] * 4 and seg.target.sum(-1).tolist() == [1] * 4
    with pytest.raises(ValueError, match="split"):
        choice_facts(world, "val")


def test_options_read_the_question_only_under_mas(facts):
    ex = choice_task(1, split="dev")[0]
    seg = qa_segments(facts, [ex])
    toks = seg.str_tokens(facts) if hasattr(seg, "str_tokens") else None
    words = ["<bos>"] + ex.prompt.split()
    assert toks is None or [t.strip() for t in toks[: len(words)]] == words
    opt = words.index(LABELS[0]) + 2  # the first option's token
    q = len(words) - 1 - words[::-1].index("question")  # the user block's (the system block says it too)
    assert words[q + 1] == ":" and q > opt
    mas, causal = seg.mask()[0, 0], seg.causal().mask()[0, 0]
    assert bool(mas[opt, q]) and not bool(causal[opt, q])
    assert bool(mas[q, opt]) and bool(causal[q, opt])


# --- finetune(on_step=) -----------------------------------------------------------------------
def test_on_step_sees_every_batch_and_can_stop(gpt2_model):
    seg = qa_segments(gpt2_model, synthetic_task(10))
    seen = []
    with preserving_weights(gpt2_model):
        ref = finetune(gpt2_model, seg, epochs=2, batch_size=4, seed=3, progress=False)
    with preserving_weights(gpt2_model):
        def watch(step, loss, rows):
            gpt2_model.eval()
            answer_metrics(gpt2_model, seg, mask="mas")  # an eval in the middle must not change training
            gpt2_model.train()
            seen.append((step, loss, rows.tolist()))
        res = finetune(gpt2_model, seg, epochs=2, batch_size=4, seed=3, progress=False, on_step=watch)
    assert torch.equal(res.losses, ref.losses) and res.steps == 6
    assert [s for s, _, _ in seen] == list(range(1, 7)) and [x for _, x, _ in seen] == res.losses.tolist()
    order = [r for _, _, rows in seen for r in rows]
    assert [order_digest(order[:10]), order_digest(order[10:])] == reference_digests(10, 4, 2, 3)
    with preserving_weights(gpt2_model):
        short = finetune(gpt2_model, seg, epochs=2, batch_size=4, seed=3, progress=False,
                         on_step=lambda step, loss, rows: step == 2)
    assert short.steps == 2 and torch.equal(short.losses, ref.losses[:2])
    assert_untouched(gpt2_model)
    assert_no_hooks(gpt2_model)
    with pytest.raises(ValueError, match="on_step"):
        finetune(gpt2_model, seg, on_step=3, progress=False)


def test_answer_metrics_is_answer_loss_and_accuracy(facts):
    seg = qa_segments(facts, TASKS["world"]["dev"](24))
    for mask in ("mas", "causal"):
        loss, acc = answer_metrics(facts, seg, mask=mask, batch_size=7)
        with torch.no_grad():
            expected = float(answer_loss(facts, seg, mask=mask))
        assert abs(loss - expected) <= fp32_rtol(facts.cfg.d_vocab) * max(1.0, expected)
        assert acc == answer_accuracy(facts, seg, mask=mask)


def test_protocol_config():
    cfg = protocol_config("choice", "facts-llama", "lora", n_train=8)
    assert cfg["lora"] == PAPER_LORA == {"r": 32, "lora_alpha": 64, "lora_dropout": 0.05, "modules": ["q", "v"]}
    assert (cfg["lr"], cfg["epochs"], cfg["n_train"], cfg["plateau"]) == (2e-4, 3, 8, False)
    assert ARMS["full"]["lora"] is None and ARMS["full"]["plateau"]
    with pytest.raises(ValueError, match="unknown or fixed"):
        protocol_config("world", "facts-gpt2", "lora", warmup=100)
    with pytest.raises(ValueError, match="arm"):
        protocol_config("world", "facts-gpt2", "qlora")


# --- the smoke run ----------------------------------------------------------------------------
@pytest.mark.parametrize("task, arm", [("world", "lora"), ("choice", "full")])
def test_smoke_group_pairing_statistics_and_files(facts, tmp_path, task, arm):
    before = {k: v.clone() for k, v in facts.state_dict().items()}
    cfg = protocol_config(task, "facts-gpt2", arm, **TINY)
    logs = []
    summary = run_group(facts, cfg, [0, 1], tmp_path, progress=False, log=logs.append)
    assert all(torch.equal(v, before[k]) for k, v in facts.state_dict().items())
    assert_untouched(facts)
    assert_no_hooks(facts)
    folder = tmp_path / f"{task}-facts-gpt2-{arm}"
    runs = {(m, s): json.loads((folder / "runs" / f"{m}-seed{s}.json").read_text())
            for m in ("causal", "mas") for s in (0, 1)}
    for (mask, seed), rec in runs.items():
        assert rec["mask"] == mask and rec["seed"] == seed and rec["config"] == json.loads(json.dumps(cfg))
        assert len(rec["losses"]) == rec["steps"] <= 6 and 0.0 <= rec["test_accuracy"] <= 1.0
        assert [c["step"] for c in rec["curve"]][0] == 0 and rec["curve"][-1]["step"] == rec["steps"]
        assert all(set(c) == {"step", "train_loss", "dev_loss", "dev_accuracy"} for c in rec["curve"])
        if arm == "lora":
            assert rec["steps"] == 6 and not rec["stopped_early"]
        # pairing: the order each run saw is finetune's seeded permutation, whatever the mask
        ref = reference_digests(12, 4, 2, seed)
        assert rec["order_digests"][: rec["steps"] // 3] == ref[: rec["steps"] // 3]
    assert runs["causal", 0]["order_digests"][0] == runs["mas", 0]["order_digests"][0]
    assert runs["causal", 0]["order_digests"][0] != runs["causal", 1]["order_digests"][0]
    # statistics recomputed from the run records
    mas = [runs["mas", s]["test_accuracy"] for s in (0, 1)]
    causal = [runs["causal", s]["test_accuracy"] for s in (0, 1)]
    assert summary["paired"]["diffs"] == [m - c for m, c in zip(mas, causal)]
    assert summary["paired"] == paired_summary(mas, causal)
    base = json.loads((folder / "base.json").read_text())
    assert set(base["test_accuracy"]) == {"causal", "mas"} == set(summary["arms"])
    table = (folder / "table.md").read_text()
    assert "| causal |" in table and "| mas |" in table and "t interval" in table and "bootstrap" in table
    assert f"{100 * summary['paired']['mean']:+.1f} points" in table
    assert "<svg" in (folder / "curve.html").read_text()
    # resume: nothing re-runs, the summary is the same
    again = run_group(facts, cfg, [0, 1], tmp_path, progress=False, log=logs.append)
    assert again == summary and sum("skipped" in line for line in logs) == 4
    assert logs[0].startswith("note: 2 seeds; the protocol asks for at least 5")
    # a record of another configuration is refused, not mixed in
    with pytest.raises(ValueError, match="another configuration"):
        run_group(facts, protocol_config(task, "facts-gpt2", arm, **{**TINY, "n_train": 16}), [0, 1], tmp_path,
                  progress=False, log=logs.append)
    md, js = collect(tmp_path)
    assert f"| {task} | facts-gpt2 | {arm} |" in md.read_text()
    assert json.loads(js.read_text())[0]["paired"] == summary["paired"]


def test_pairing_check_catches_a_different_order():
    rec = {"order_digests": ["aa", "bb"]}
    runs = {"causal": {0: rec}, "mas": {0: {"order_digests": ["aa", "cc"]}}}
    with pytest.raises(ValueError, match="different data orders"):
        check_pairing(runs, [0])
    check_pairing({"causal": {0: rec}, "mas": {0: {"order_digests": ["aa", "bb-partial"]}}}, [0])


def test_cli_runs_a_group_and_collects(tmp_path, capsys):
    args = ["--task", "choice", "--model", "facts-gpt2", "--arm", "lora", "--seeds", "0", "1", "--out", str(tmp_path),
            "--no-progress"] + [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    (summary,) = main(args)
    out = capsys.readouterr().out
    assert "[choice-facts-gpt2-lora 4/4] mas seed 1: test accuracy" in out and "mas_protocol.md" in out
    assert summary["config"]["lora"] == PAPER_LORA and summary["config"]["lr"] == 2e-4
    assert math.isfinite(summary["paired"]["mean"]) and (tmp_path / "mas_protocol.json").is_file()
    main(["--collect", "--out", str(tmp_path)])
    assert "| choice | facts-gpt2 | lora |" in (tmp_path / "mas_protocol.md").read_text()
