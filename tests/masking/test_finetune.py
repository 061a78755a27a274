"""mas_finetune / causal_finetune: answer-only loss, determinism, in-place edits with exact undo, LoRA merge.

The session fixtures are fine-tuned in place inside ``preserving_weights`` (which the tests also check
restores them exactly).
"""

import importlib.util

import pytest
import torch

from tl_backward.masking import (answer_loss, causal_finetune, finetune, mas_finetune, preserving_weights,
                                 restore_weights, segment_mask, snapshot_weights)
from tl_backward.masking import segments as S
from tests.tolerance import MODEL_TERMS, assert_close_fp32, fp32_rtol

PROMPTS = [["the cat sat on the mat", "where is the cat ?"], ["a big dog ran", "what ran ?"],
           ["red and blue", "what is red ?"], ["paris is in france", "where is paris ?"]]
ANSWERS = ["A : mat", "A : dog", "A : blue", "A : france"]
HAS_PEFT = importlib.util.find_spec("peft") is not None


def data(model):
    return S.from_blocks(model, PROMPTS, ANSWERS)


def manual_nll(logits, seg):
    logp = logits[:, :-1].log_softmax(-1)
    nll = -logp.gather(-1, seg.tokens[:, 1:, None])[..., 0]
    return nll[seg.target[:, 1:]].mean()


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_answer_loss_matches_plain_forwards(model):
    seg = data(model)
    with torch.no_grad():
        plain = model(seg.tokens)  # right padding: causal real positions are unaffected
        with segment_mask(model, seg):
            mas = model(seg.tokens)
        assert_close_fp32(answer_loss(model, seg, mask="causal"), manual_nll(plain, seg), n_terms=MODEL_TERMS)
        assert_close_fp32(answer_loss(model, seg, mask="mas"), manual_nll(mas, seg), n_terms=MODEL_TERMS)
        # the masks really differ: by more than fp32 noise (measured ≥ 6e-4 relative)
        assert not torch.allclose(answer_loss(model, seg, mask="mas"), answer_loss(model, seg, mask="causal"),
                                  rtol=fp32_rtol(MODEL_TERMS), atol=0)


def test_loss_ignores_prompt_tokens(model):
    seg = data(model)
    # Marking one more (prompt) block as target must change the loss: only targets are scored.
    widened = S.Segments(seg.tokens, seg.segment_ids.masked_fill(seg.segment_ids == 1, -1), seg.valid,
                         seg.target | (seg.segment_ids == 1))
    with torch.no_grad():
        assert not torch.allclose(answer_loss(model, seg, mask="causal"), answer_loss(model, widened, mask="causal"),
                                  rtol=fp32_rtol(MODEL_TERMS), atol=0)  # by more than fp32 noise


def test_finetune_is_deterministic_edits_in_place_and_undo_is_exact(model):
    seg = data(model)
    base = params(model)
    runs = []
    frozen = next(iter(model.parameters()))
    for seed in (7, 7, 8):
        with preserving_weights(model):
            frozen.requires_grad_(False)
            try:
                res = mas_finetune(model, seg, epochs=2, lr=1e-2, batch_size=2, seed=seed, progress=False)
                assert not model.training and all(p.grad is None for p in model.parameters())
                assert not frozen.requires_grad and torch.equal(frozen, base[0])
            finally:
                frozen.requires_grad_(True)
            runs.append((res, params(model)))
            assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), base))
            assert res.steps == 4 and res.losses.shape == (4,) and res.mask == "mas" and not res.lora
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), base))  # undone exactly
    assert torch.equal(runs[0][0].losses, runs[1][0].losses)
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert not torch.equal(runs[2][0].losses, runs[0][0].losses)


def test_first_step_loss_is_the_arm_mask_loss_and_training_helps(model):
    seg = data(model)
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(5))
    for mask in ("mas", "causal"):
        with torch.no_grad():
            first = answer_loss(model, seg.select(perm[:2]), mask=mask)
            start = answer_loss(model, seg, mask=mask)
        with preserving_weights(model):
            res = finetune(model, seg, mask=mask, epochs=4, lr=3e-2, batch_size=2, seed=5, progress=False)
            # the first step's loss is the first batch's, from another forward pass
            assert abs(res.losses[0].item() - first.item()) <= fp32_rtol(MODEL_TERMS) * abs(first.item())
            with torch.no_grad():
                assert answer_loss(model, seg, mask=mask) < start - 0.5
    with preserving_weights(model):
        res = causal_finetune(model, [seg.select(0), seg.select([1, 2])], epochs=1, batch_size=3, progress=False)
    assert res.mask == "causal" and res.steps == 1


def test_snapshot_and_restore(gpt2_model):
    snap = snapshot_weights(gpt2_model)
    with preserving_weights(gpt2_model):
        mas_finetune(gpt2_model, data(gpt2_model), epochs=1, batch_size=4, lr=1e-2, progress=False)
        tuned = snapshot_weights(gpt2_model)
    assert all(torch.equal(v, snap[k]) for k, v in gpt2_model.state_dict().items())
    with preserving_weights(gpt2_model):
        restore_weights(gpt2_model, tuned)
        assert any(not torch.equal(v, snap[k]) for k, v in gpt2_model.state_dict().items())
    assert all(torch.equal(v, snap[k]) for k, v in gpt2_model.state_dict().items())


def test_finetune_errors(model):
    seg = data(model)
    no_answers = S.from_blocks(model, PROMPTS[:2])
    with preserving_weights(model):
        with pytest.raises(ValueError, match="answer tokens"):
            mas_finetune(model, no_answers, progress=False)
        with pytest.raises(ValueError, match="mask"):
            finetune(model, seg, mask="bidirectional")
        with pytest.raises(ValueError, match="epochs"):
            mas_finetune(model, seg, epochs=0)
        with pytest.raises(TypeError, match="dataset"):
            mas_finetune(model, ["not segments"])
        if HAS_PEFT:
            with pytest.raises(ValueError, match="unknown keys"):
                mas_finetune(model, seg, lora={"rank": 4}, progress=False)
    assert all(p.requires_grad and p.grad is None for p in model.parameters()) and not model.training


@pytest.mark.bridge_only("LoRA adapts Linear modules, which a HookedTransformer does not have (refused; tests/masking/test_hooked_mas.py)")
@pytest.mark.skipif(not HAS_PEFT, reason="peft (optional extra 'lora') not installed")
def test_lora_adapters_are_used_and_merge_exactly(model):
    from tl_backward.masking.finetune import _inject_lora, _merge_lora

    seg = data(model)
    with torch.no_grad():
        base = model(seg.tokens)
    flags = [(p, p.requires_grad) for p in model.parameters()]  # peft's injection freezes the base
    with preserving_weights(model):
        layers = _inject_lora(model, {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0})
        try:
            assert len(layers) == 2 * model.cfg.n_layers
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for layer in layers:
                    for p in layer.lora_B.parameters():
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
                adapted = model(seg.tokens)
                assert not torch.allclose(base, adapted, atol=1e-3)  # the bridge's forward runs the adapters
        finally:
            with torch.no_grad():
                _merge_lora(model, layers)
            for p, flag in flags:
                p.requires_grad_(flag)
        with torch.no_grad():
            assert_close_fp32(model(seg.tokens), adapted, n_terms=MODEL_TERMS)  # merged W + BA vs x·W + x·A·B
        assert type(model.blocks[0].attn.q.original_component).__name__ in ("Linear", "Conv1D")
    with torch.no_grad():
        assert torch.equal(model(seg.tokens), base)


@pytest.mark.bridge_only("LoRA adapts Linear modules, which a HookedTransformer does not have (refused; tests/masking/test_hooked_mas.py)")
@pytest.mark.skipif(not HAS_PEFT, reason="peft (optional extra 'lora') not installed")
def test_lora_finetune_changes_only_q_and_v(model):
    seg = data(model)
    names = [n for n, _ in model.named_parameters()]
    before = {n: p.clone() for n, p in model.named_parameters()}
    with preserving_weights(model):
        res = mas_finetune(model, seg, epochs=2, lr=1e-2, batch_size=2, lora={"r": 4, "lora_alpha": 8},
                           progress=False)
        assert res.lora and [n for n, _ in model.named_parameters()] == names
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        # (GPT-2/NeoX's split q/v share storage with the joint qkv weight)
        q_v = {n for n in names if any(k in n for k in (".q.", ".v.", "q_proj", "v_proj", ".qkv."))}
        assert changed and changed <= q_v
        assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
        assert "peft_config" not in vars(model.original_model)


def test_progress_bar_reports_steps(gpt2_model, capsys):
    with preserving_weights(gpt2_model):
        mas_finetune(gpt2_model, data(gpt2_model), epochs=1, batch_size=2, lr=1e-3, progress=True)
    err = capsys.readouterr().err
    assert "mas fine-tune" in err and "2/2" in err
