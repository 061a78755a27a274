"""The measured comparison's pieces: tasks, accuracy against a per-example recomputation, the table."""

import pytest
import torch

from tl_backward.masking.experiment import (answer_accuracy, format_table, mas_comparison, qa_segments,
                                         synthetic_task)
from tl_backward.masking import segment_mask
from tl_backward.masking import segments as S


def test_synthetic_task_is_answerable_and_split():
    train, test = synthetic_task(50), synthetic_task(50, split="test")
    assert train == synthetic_task(50) and train != test
    for ex in train:
        user = ex.prompt.split("###")[1]
        asked = user.split("what is the ")[1].split(" ?")[0]
        assert f"the {asked} is {ex.answer} ." in user
    with pytest.raises(ValueError, match="split"):
        synthetic_task(3, split="dev")


def test_answer_accuracy_matches_single_example_forwards(gpt2_model):
    exs = synthetic_task(12, split="test")
    segs = qa_segments(gpt2_model, exs)
    assert segs.n_blocks.tolist() == [2] * 12 and segs.target.sum(-1).tolist() == [1] * 12
    for mask in ("mas", "causal"):
        hits = 0
        for ex in exs:
            one = S.from_delimiter(gpt2_model, ex.prompt)
            one = one if mask == "mas" else one.causal()
            with torch.no_grad(), segment_mask(gpt2_model, one):
                pred = gpt2_model(one.tokens)[0, -1].argmax()
            hits += int(pred == gpt2_model.tokenizer.convert_tokens_to_ids(ex.answer))
        assert answer_accuracy(gpt2_model, segs, mask=mask, batch_size=5) == hits / 12


def test_mas_comparison_runs_both_arms_and_leaves_the_base_alone(gpt2_model):
    before = [p.clone() for p in gpt2_model.parameters()]
    res = mas_comparison(gpt2_model, task="synthetic", n_train=8, n_test=8, batch_size=8, seeds=(0, 1),
                         progress=False, verbose=False)
    assert all(torch.equal(p, b) for p, b in zip(gpt2_model.parameters(), before))
    assert res["task"] == "synthetic" and set(res["arms"]) == {"causal", "mas"}
    for arm in res["arms"].values():
        assert len(arm["accuracy"]) == 2 and 0 <= arm["mean"] <= 1 and arm["steps"] == 1
    table = format_table(res)
    assert "| causal |" in table and "| mas |" in table and "Δ (MAS − causal)" in table
    with pytest.raises(ValueError, match="task"):
        mas_comparison(gpt2_model, task="chat", verbose=False)
