"""The measured comparison's pieces: tasks, accuracy against a per-example recomputation, the table."""

import dataclasses
import json
import statistics

import pytest
import torch

from tl_backward.masking.experiment import (ArmResult, MASComparison, answer_accuracy, format_table, mas_comparison,
                                            qa_segments, synthetic_task)
from tl_backward.masking import finetune, preserving_weights, restore_weights, segment_mask
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
    assert isinstance(res, MASComparison) and res.task == "synthetic" and set(res.arms) == {"causal", "mas"}
    assert res.seeds == (0, 1) and res.weights is None and res.base_model is None
    test = qa_segments(gpt2_model, synthetic_task(8, split="test"))
    train = qa_segments(gpt2_model, synthetic_task(8, split="train"))
    for name, arm in res.arms.items():
        assert isinstance(arm, ArmResult) and arm.arm == name and arm.steps == 1
        assert res.base_accuracy[name] == answer_accuracy(gpt2_model, test, mask=name)
        # seed 0 of this arm, re-run by hand: the same fine-tune gives the same accuracy
        with preserving_weights(gpt2_model):
            finetune(gpt2_model, train, mask=name, epochs=1, lr=1e-3, batch_size=8, seed=0, progress=False)
            assert arm.accuracy[0] == answer_accuracy(gpt2_model, test, mask=name)
        assert arm.mean == statistics.fmean(arm.accuracy) and arm.std == statistics.stdev(arm.accuracy)
    assert res.delta_mas_minus_causal == res.arms["mas"].mean - res.arms["causal"].mean
    table = format_table(res)
    assert table == res.table()
    assert "| causal |" in table and "| mas |" in table and "Δ (MAS − causal)" in table
    assert f"{100 * res.arms['mas'].mean:.1f} ± {100 * res.arms['mas'].std:.1f} %" in table
    # frozen, dict-style reads, JSON-able
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.task = "world"
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.arms["mas"].mean = 1.0
    with pytest.raises(TypeError):
        res.arms["mas"] = res.arms["causal"]
    assert res["arms"]["mas"]["accuracy"] == res.arms["mas"].accuracy and res["base_accuracy"]["causal"] == res.base_accuracy["causal"]
    d = json.loads(json.dumps(res.to_dict()))
    assert d["arms"]["mas"] == json.loads(json.dumps(dataclasses.asdict(res.arms["mas"])))
    assert d["delta_mas_minus_causal"] == res.delta_mas_minus_causal and "weights" not in d
    assert "\n" not in repr(res) and "\n" not in repr(res.arms["mas"])
    with pytest.raises(ValueError, match="task"):
        mas_comparison(gpt2_model, task="chat", verbose=False)


def test_keep_models_puts_the_weights_in_the_result(gpt2_model):
    res = mas_comparison(gpt2_model, task="synthetic", n_train=8, n_test=8, batch_size=8, seeds=(0,),
                         progress=False, verbose=False, keep_models=True)
    assert res.base_model is gpt2_model and set(res.weights) == {"causal", "mas"}
    with pytest.raises(TypeError):
        res.weights["mas"] = {}
    test = qa_segments(gpt2_model, synthetic_task(8, split="test"))
    for arm in ("causal", "mas"):
        with preserving_weights(gpt2_model):
            restore_weights(gpt2_model, res.weights[arm])
            assert answer_accuracy(gpt2_model, test, mask=arm) == res.arms[arm].accuracy[0]
    d = json.loads(json.dumps(res.to_dict()))
    assert "weights" not in d and "base_model" not in d and d["arms"]["mas"]["accuracy"] == list(res.arms["mas"].accuracy)
