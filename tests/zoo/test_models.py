"""The shipped models: offline loading, architecture, size, TransformerLens compatibility, and the
card's fact-recall figure reproduced on its fixed sample."""

import json
import socket

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from tl_backward import zoo
from tl_backward.zoo.evaluate import fact_recall, top1_correct
from tl_backward.zoo.tokenizer import encode
from tests.tolerance import assert_close_fp32
from tl_backward.zoo.world import World

SHIPPED = zoo.list_models()
pytestmark = pytest.mark.skipif(not SHIPPED, reason="no embedded model shipped yet")


@pytest.fixture(scope="module", params=SHIPPED)
def loaded(request):
    """(name, model, tokenizer) loaded with every network connection refused."""
    name = request.param
    mp = pytest.MonkeyPatch()

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    mp.setattr(socket.socket, "connect", refuse)
    mp.setenv("HF_HUB_OFFLINE", "1")
    try:
        d = zoo.model_dir(name)
        model = AutoModelForCausalLM.from_pretrained(d, local_files_only=True)
        tok = PreTrainedTokenizerFast.from_pretrained(d)
    finally:
        mp.undo()
    return name, model, tok


def test_zoo_api():
    assert zoo.DEFAULT_MODEL == "facts-gpt2" and zoo.DEFAULT_MODEL in SHIPPED
    assert zoo.model_dir("facts-gpt2").is_dir()
    with pytest.raises(ValueError, match="facts-gpt2"):
        zoo.model_dir("gpt2-xl")
    with pytest.raises(TypeError, match="name"):
        zoo.model_dir(3)
    card = zoo.model_card("facts-gpt2")
    assert {"fact_recall", "paraphrase_recall", "icl", "segment_qa"} <= set(card["figures"])


def test_files_small_and_complete(loaded):
    name, _, _ = loaded
    d = zoo.model_dir(name)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "card.md", "card.json"):
        assert (d / f).is_file(), f
    assert sum(p.stat().st_size for p in d.iterdir()) <= 10 * 2**20
    assert json.loads((d / "tokenizer_config.json").read_text())["add_bos_token"] is True


def test_shipped_tokenizer_matches_world_vocabulary(loaded):
    from tl_backward.zoo.tokenizer import build_tokenizer

    name, _, tok = loaded
    world = World(zoo.model_card(name)["train_config"]["world_seed"])
    assert tok.get_vocab() == build_tokenizer(world.vocabulary).get_vocab()
    text = world.segment_examples(1)[0].text
    assert encode(tok, text) == encode(build_tokenizer(world.vocabulary), text)


def test_architecture(loaded):
    name, model, tok = loaded
    cfg = model.config
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert cfg.vocab_size == len(tok)
    if name == "facts-gpt2":
        assert cfg.model_type == "gpt2" and cfg.activation_function.startswith("gelu")
        assert model.transformer.h[0].ln_1.bias is not None
    else:
        assert cfg.model_type == "llama" and cfg.hidden_act == "silu"
        assert cfg.num_key_value_heads < cfg.num_attention_heads


def test_card_recall_reproduced_on_fixed_sample(loaded):
    name, model, tok = loaded
    card = zoo.model_card(name)
    world = World(card["train_config"]["world_seed"])
    sample = card["figures"]["fact_recall_sample"]
    got = fact_recall(model, tok, world, limit=sample["n"], seed=sample["seed"])
    assert got["n"] == sample["n"]
    assert abs(got["accuracy"] - sample["accuracy"]) <= 100.0 / sample["n"]  # at most one argmax tie flips
    # and the sample is representative of the full figure written in the card
    assert abs(sample["accuracy"] - card["figures"]["fact_recall"]["accuracy"]) <= 5.0


def test_recall_check_can_fail(loaded):
    """The scorer is not vacuous: wrong targets score ~0."""
    _, model, tok = loaded
    world = World(0)
    items = world.recall_prompts()[:64]
    wrong = [" " + ("paris" if t != "paris" else "rome") for _, _, t in items]
    assert sum(top1_correct(model, tok, [p for _, p, _ in items], wrong)) <= 2


def test_bridge_boots_with_bos_and_matches_hf(loaded):
    from tl_backward.core.compat import TransformerBridge

    name, model, tok = loaded
    bridge = TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tok)
    text = "the capital of france is"
    tokens = bridge.to_tokens(text)
    assert tokens[0].tolist() == encode(tok, text)
    with torch.no_grad():
        ours = bridge(tokens)
        ref = model(input_ids=tokens).logits
    # a whole forward pass: vocab + per layer d_model, d_mlp and position reductions
    cfg = model.config
    d_mlp = getattr(cfg, "n_inner", None) or getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size
    n_terms = cfg.vocab_size + cfg.num_hidden_layers * (cfg.hidden_size + d_mlp + tokens.shape[1])
    assert_close_fp32(ours, ref, n_terms=n_terms, what="logits")
    assert tok.decode(ref[0, -1].argmax().item()) == "paris"
    assert bridge.to_tokens("Q: x ###", prepend_bos=False)[0].tolist() == encode(tok, "Q: x ###", prepend_bos=False)


@pytest.mark.slow
def test_card_quality_figures_reproduced(loaded):
    """Paraphrase recall, segment-QA and the three largest 0->5-shot ICL gains, re-measured."""
    from tl_backward.zoo.evaluate import icl_accuracy, segment_qa_accuracy

    name, model, tok = loaded
    fig = zoo.model_card(name)["figures"]
    world = World(zoo.model_card(name)["train_config"]["world_seed"])
    para = fact_recall(model, tok, world, held_out=True)
    assert abs(para["accuracy"] - fig["paraphrase_recall"]["accuracy"]) <= 100.0 / para["n"]
    seg = segment_qa_accuracy(model, tok, world, n=400)
    assert abs(seg - fig["segment_qa"]) <= 100.0 / 400
    top = sorted(fig["icl_gain_5_vs_0"], key=fig["icl_gain_5_vs_0"].get, reverse=True)[:3]
    table = icl_accuracy(model, tok, world, shots=(0, 5), tasks=top)
    for task in top:
        n = 3 * len(world.icl_pairs(task, "test"))
        for k in (0, 5):
            assert abs(table[task][k] - fig["icl"][task][str(k)]) <= 100.0 / n, (task, k)
    # the targets: recall >= 95 %, and >= 20-point 5-shot gains on at least three tasks
    assert fig["fact_recall"]["accuracy"] >= 95.0
    assert sum(table[t][5] - table[t][0] >= 20 for t in top) >= 3
