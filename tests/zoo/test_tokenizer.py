"""The word-level tokenizer: ids, round trips over the corpus, save/reload, tiny.py compatibility."""

import random
import re

from transformers import PreTrainedTokenizerFast

from tl_backward.zoo.tiny import TINY_WORDS, word_tokenizer
from tl_backward.zoo.tokenizer import SPECIALS, build_tokenizer, encode
from tl_backward.zoo.train import CONFIGS, document
from tl_backward.zoo.world import World


def _expected_words(text):
    return re.findall(r"###|[^\W_]+|[^\w\s]", text)


def _corpus(world, n=600):
    rng = random.Random(0)
    texts = [document(world, rng, CONFIGS["facts-gpt2"]) for _ in range(n)]
    texts += [p for _, p, _ in world.recall_prompts()] + [p for _, p, _ in world.recall_prompts(held_out=True)]
    texts += [e.text for e in world.segment_examples(50, "test")]
    texts += [p for t in ("antonym", "successor") for p, _, _ in world.icl_examples(t, 10)]
    for r in world.edit_requests(20):
        texts += [r["prompt"], *r["paraphrases"], *r["neighborhood"], r["target_new"]]
    return texts


def test_special_ids_and_unknown_words():
    tok = build_tokenizer(["cat", "###"])
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4, 5]) == [*SPECIALS, "cat", "###"]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert encode(tok, "cat ### dog.") == [1, 4, 5, 3, 3]
    assert encode(tok, "cat", prepend_bos=False) == [4]


def test_round_trip_every_corpus_sentence(tmp_path):
    world = World(0)
    tok = build_tokenizer(world.vocabulary, name="facts")
    tok.save_pretrained(tmp_path)
    reloaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    texts = _corpus(world)
    assert len(texts) > 3000
    for text in texts:
        ids = encode(tok, text, prepend_bos=False)
        assert tok.unk_token_id not in ids, text
        assert tok.convert_ids_to_tokens(ids) == _expected_words(text), text
        assert tok.decode(ids) == " ".join(_expected_words(text))
        assert encode(reloaded, text) == [tok.bos_token_id] + ids
        assert reloaded.decode(ids) == tok.decode(ids)


def test_tiny_tokenizer_ids_unchanged():
    tok = word_tokenizer()
    assert tok.convert_ids_to_tokens(list(range(4))) == list(SPECIALS)
    words = [w for w in TINY_WORDS if w not in SPECIALS]
    ids = tok.convert_tokens_to_ids(words)
    assert ids == list(range(4, 4 + len(words)))
    assert encode(tok, "the cat sat on the mat .", prepend_bos=False) == tok.convert_tokens_to_ids(
        "the cat sat on the mat .".split())
