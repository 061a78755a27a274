"""mas_finetune / causal_finetune: answer-only loss, determinism, in-place edits, LoRA merge."""

import importlib.util

import pytest
import torch

from tl_backward.masking import answer_loss, causal_finetune, copy_model, finetune, mas_finetune, segment_mask
from tl_backward.masking import segments as S

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


def test_answer_loss_matches_plain_forwards(model):
    seg = data(model)
    with torch.no_grad():
        plain = model(seg.tokens)  # right padding: causal real positions are unaffected
        with segment_mask(model, seg):
            mas = model(seg.tokens)
        assert torch.allclose(answer_loss(model, seg, mask="causal"), manual_nll(plain, seg), atol=1e-5)
        assert torch.allclose(answer_loss(model, seg, mask="mas"), manual_nll(mas, seg), atol=1e-5)
        assert not torch.allclose(answer_loss(model, seg, mask="mas"), answer_loss(model, seg, mask="causal"))


def test_loss_ignores_prompt_tokens(model):
    seg = data(model)
    # The causal loss of the answers cannot depend on what follows them, nor count prompt positions:
    # marking one more (prompt) position as target must change it.
    widened = S.Segments(seg.tokens, seg.segment_ids.masked_fill(seg.segment_ids == 1, -1), seg.valid,
                         seg.target | (seg.segment_ids == 1))
    with torch.no_grad():
        assert not torch.allclose(answer_loss(model, seg, mask="causal"), answer_loss(model, widened, mask="causal"))


def test_finetune_is_deterministic_and_edits_in_place(model):
    seg = data(model)
    runs = []
    for _ in range(2):
        m = copy_model(model)
        frozen = next(iter(m.parameters()))
        frozen.requires_grad_(False)
        frozen_before = frozen.clone()
        before = [p.clone() for p in m.parameters()]
        res = mas_finetune(m, seg, epochs=3, lr=1e-2, batch_size=2, seed=7, progress=False)
        runs.append((res, [p.detach().clone() for p in m.parameters()]))
        assert not m.training and all(p.grad is None for p in m.parameters())
        assert not frozen.requires_grad and torch.equal(frozen, frozen_before)
        assert any(not torch.equal(p, b) for p, b in zip(m.parameters(), before))
        assert res.steps == 6 and res.losses.shape == (6,) and res.mask == "mas" and not res.lora
    assert torch.equal(runs[0][0].losses, runs[1][0].losses)
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    other = mas_finetune(copy_model(model), seg, epochs=3, lr=1e-2, batch_size=2, seed=8, progress=False)
    assert not torch.equal(other.losses, runs[0][0].losses)


def test_first_step_loss_is_the_arm_mask_loss_and_training_helps(model):
    seg = data(model)
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(5))
    for mask in ("mas", "causal"):
        with torch.no_grad():
            first = answer_loss(model, seg.select(perm[:2]), mask=mask)
        m = copy_model(model)
        res = finetune(m, seg, mask=mask, epochs=10, lr=1e-2, batch_size=2, seed=5, progress=False)
        assert abs(res.losses[0].item() - first.item()) < 1e-5
        with torch.no_grad():
            assert answer_loss(m, seg, mask=mask) < answer_loss(model, seg, mask=mask) - 0.5
    res = causal_finetune(copy_model(model), [seg.select(0), seg.select([1, 2])], epochs=1, batch_size=3,
                          progress=False)
    assert res.mask == "causal" and res.steps == 1


def test_finetune_errors(model):
    seg = data(model)
    no_answers = S.from_blocks(model, PROMPTS[:2])
    with pytest.raises(ValueError, match="answer tokens"):
        mas_finetune(copy_model(model), no_answers, progress=False)
    with pytest.raises(ValueError, match="mask"):
        finetune(model, seg, mask="bidirectional")
    with pytest.raises(ValueError, match="epochs"):
        mas_finetune(model, seg, epochs=0)
    with pytest.raises(TypeError, match="dataset"):
        mas_finetune(model, ["not segments"])
    if HAS_PEFT:
        with pytest.raises(ValueError, match="unknown keys"):
            mas_finetune(copy_model(model), seg, lora={"rank": 4}, progress=False)


def test_copy_model_works_after_a_grad_forward_and_is_independent(model):
    seg = data(model)
    answer_loss(model, seg)  # grad-enabled: some bridges keep the last pattern with its graph
    clone = copy_model(model)
    with torch.no_grad():
        assert torch.equal(clone(seg.tokens), model(seg.tokens))
    assert all(a is not b for a, b in zip(clone.parameters(), model.parameters()))


@pytest.mark.skipif(not HAS_PEFT, reason="peft (optional extra 'lora') not installed")
def test_lora_adapters_are_used_and_merge_exactly(model):
    from tl_backward.masking.finetune import _inject_lora, _merge_lora

    seg = data(model)
    m = copy_model(model)
    layers = _inject_lora(m, {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0})
    assert len(layers) == 2 * m.cfg.n_layers
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in layers:
            for p in layer.lora_B.parameters():
                p.normal_(0, 0.2)
        base = model(seg.tokens)
        adapted = m(seg.tokens)
        assert not torch.allclose(base, adapted, atol=1e-3)  # the bridge's forward runs the adapters
        _merge_lora(m, layers)
        assert torch.allclose(m(seg.tokens), adapted, atol=1e-5)
    assert type(m.blocks[0].attn.q.original_component).__name__ in ("Linear", "Conv1D")


@pytest.mark.skipif(not HAS_PEFT, reason="peft (optional extra 'lora') not installed")
def test_lora_finetune_changes_only_q_and_v(model):
    seg = data(model)
    m = copy_model(model)
    names = [n for n, _ in m.named_parameters()]
    before = {n: p.clone() for n, p in m.named_parameters()}
    res = mas_finetune(m, seg, epochs=2, lr=1e-2, batch_size=2, lora={"r": 4, "lora_alpha": 8}, progress=False)
    assert res.lora and [n for n, _ in m.named_parameters()] == names
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    q_v = {n for n in names if ".q." in n or ".v." in n or "q_proj" in n or "v_proj" in n}
    assert changed and changed <= q_v
    assert all(p.requires_grad for p in m.parameters()) and all(p.grad is None for p in m.parameters())
