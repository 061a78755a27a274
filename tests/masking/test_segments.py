"""Segments: builders (blocks, delimiter, chat), validation errors, batching helpers."""

from types import SimpleNamespace

import pytest
import torch

from tl_backward import masking
from tl_backward.masking import segments as S
from tl_backward.zoo.tiny import TINY_WORDS, word_tokenizer
from tl_backward.zoo.tokenizer import build_tokenizer

CHAT = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} ###\n{% endfor %}"
        "{% if add_generation_prompt %}A :{% endif %}")


@pytest.fixture(scope="module")
def tiny():
    return SimpleNamespace(tokenizer=word_tokenizer())


@pytest.fixture(scope="module")
def zoo():
    """The zoo tokenizer keeps '###' as one token; a chat template is attached for from_chat."""
    tok = build_tokenizer(TINY_WORDS)
    tok.chat_template = CHAT
    return SimpleNamespace(tokenizer=tok)


def enc(m, text):
    return m.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_from_blocks_layout(tiny):
    seg = S.from_blocks(tiny, ["the cat sat", "where is the cat ?"], "on the mat")
    b0, b1, ans = enc(tiny, "the cat sat"), enc(tiny, "where is the cat ?"), enc(tiny, "on the mat")
    assert seg.tokens[0].tolist() == [1] + b0 + b1 + ans
    assert seg.segment_ids[0].tolist() == [0] * (1 + len(b0)) + [1] * len(b1) + [-1] * len(ans)
    assert seg.target[0].tolist() == [False] * (1 + len(b0) + len(b1)) + [True] * len(ans)
    assert seg.valid.all() and not seg.left_padded
    assert seg.spans() == [(0, 1 + len(b0)), (1 + len(b0), 1 + len(b0) + len(b1))]
    assert seg.n_blocks.tolist() == [2]
    no_bos = S.from_blocks(tiny, ["the cat sat"], prepend_bos=False)
    assert no_bos.tokens[0].tolist() == b0 and no_bos.segment_ids[0].tolist() == [0] * len(b0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_from_blocks_batch_padding_matches_single_rows(tiny, side):
    prompts = [["the cat", "where is it ?"], ["a big red dog ran", "who", "what is it"]]
    answers = ["on the mat", "dog"]
    batch = S.from_blocks(tiny, prompts, answers, padding_side=side)
    assert batch.left_padded == (side == "left")
    for b, (p, a) in enumerate(zip(prompts, answers)):
        single = S.from_blocks(tiny, p, a)
        v = batch.valid[b]
        for name in ("tokens", "segment_ids", "target"):
            assert torch.equal(getattr(batch, name)[b][v], getattr(single, name)[0])
        assert (batch.segment_ids[b][~v] == -1).all()
        assert torch.equal(batch.position_ids[b][v], torch.arange(int(v.sum())))


def test_from_blocks_errors(tiny):
    with pytest.raises(ValueError, match="empty segment"):
        S.from_blocks(tiny, ["the cat", ""])
    with pytest.raises(TypeError, match="list of strings"):
        S.from_blocks(tiny, "the cat")
    with pytest.raises(ValueError, match="give at least one block"):
        S.from_blocks(tiny, [[], ["the"]])
    with pytest.raises(ValueError, match="one string per prompt"):
        S.from_blocks(tiny, [["the"], ["cat"]], ["a", "b", "c"])
    with pytest.raises(ValueError, match="padding_side"):
        S.from_blocks(tiny, ["the"], padding_side="middle")


def test_from_delimiter_single_token_delimiter(zoo):
    seg = S.from_delimiter(zoo, "the cat ### where is it ? ### A :", answer="mat")
    words = ["<bos>", "the", "cat", "###", "where", "is", "it", "?", "###", "A", ":", "mat"]
    assert seg.tokens[0].tolist() == zoo.tokenizer.convert_tokens_to_ids(words)
    assert seg.segment_ids[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, -1, -1, -1]
    assert seg.target[0].tolist() == [False] * 11 + [True]


def test_from_delimiter_multi_token_delimiter_closes_at_its_last_piece(tiny):
    # "? :" is two tokens; the block ends with the second.
    seg = S.from_delimiter(tiny, "the cat ? : where is it", delimiter="? :")
    assert seg.segment_ids[0].tolist() == [0, 0, 0, 0, 0, -1, -1, -1]


def test_from_delimiter_batch_and_errors(zoo):
    seg = S.from_delimiter(zoo, ["a ### b ### c", "the ### d"], padding_side="left")
    assert seg.left_padded and seg.n_blocks.tolist() == [2, 1]
    with pytest.raises(ValueError, match="no delimiter"):
        S.from_delimiter(zoo, "the cat sat")
    with pytest.raises(ValueError, match="non-empty"):
        S.from_delimiter(zoo, "the ###", delimiter="")


def test_from_chat_with_template(zoo):
    msgs = [{"role": "system", "content": "the cat"}, {"role": "user", "content": "where is the cat ?"},
            {"role": "assistant", "content": "on the mat"}, {"role": "user", "content": "who ?"}]
    seg = S.from_chat(zoo, msgs)
    tok = zoo.tokenizer
    ids = seg.tokens[0].tolist()
    assert ids[0] == tok.bos_token_id and seg.segment_ids[0, 0] == 0  # BOS joins block 0
    assert seg.n_blocks.tolist() == [3]
    spans = seg.spans()
    # (compare token strings: the WordPiece decoder mangles "###")
    words = lambda a, b: " ".join(tok.convert_ids_to_tokens(ids[a:b]))  # noqa: E731
    texts = [words(a, b) for a, b in spans]
    assert texts[0].endswith("the cat ###") and texts[1].endswith("where is the cat ? ###")
    assert texts[2].endswith("who ? ###")
    # Assistant turn and generation header are causal.
    assert "on the mat" in words(spans[1][1], spans[2][0])
    assert words(spans[2][1], len(ids)) == "A :"


def test_from_chat_fallback_template_and_leading_assistant(tiny):
    msgs = [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "the cat"}]
    seg = S.from_chat(tiny, msgs)
    assert seg.segment_ids[0, 0] == -1  # BOS stays causal when block 0 does not start after it
    assert seg.n_blocks.tolist() == [1]
    with pytest.raises(ValueError, match="'role' and 'content'"):
        S.from_chat(tiny, [{"content": "x"}])
    with pytest.raises(ValueError, match="empty"):
        S.from_chat(tiny, [[], [{"role": "user", "content": "x"}]])


def test_from_spans_errors():
    toks = torch.arange(6)[None]
    assert S.from_spans(toks, [(0, 2), (3, 5)]).segment_ids.tolist() == [[0, 0, -1, 1, 1, -1]]
    with pytest.raises(ValueError, match="out of range"):
        S.from_spans(toks, [(0, 7)])
    with pytest.raises(ValueError, match="empty"):
        S.from_spans(toks, [(2, 2)])
    with pytest.raises(ValueError, match="overlaps"):
        S.from_spans(toks, [(0, 3), (2, 4)])
    with pytest.raises(ValueError, match="padding"):
        S.from_spans(toks, [(0, 3)], valid=torch.tensor([[False, True, True, True, True, True]]))
    with pytest.raises(ValueError, match="one list"):
        S.from_spans(torch.zeros(2, 4, dtype=torch.long), [[(0, 1)]])


@pytest.mark.parametrize("ids, msg", [
    ([0, -1, 0], "contiguous"),
    ([1, 1, 0], "increase"),
    ([0, 2, 2], "gaps"),
    ([-2, 0, 0], ">= -1"),
])
def test_from_ids_rejects_bad_layouts(ids, msg):
    with pytest.raises(ValueError, match=msg):
        S.from_ids(torch.arange(3), torch.tensor(ids))


def test_validation_of_padding_targets_and_types():
    toks = torch.arange(4)[None]
    with pytest.raises(ValueError, match="padding tokens"):
        S.from_ids(toks, torch.tensor([0, 0, -1, -1]), valid=torch.tensor([False, True, True, True]))
    with pytest.raises(ValueError, match="must be causal"):
        S.from_ids(toks, torch.tensor([0, 0, -1, -1]), target=torch.tensor([False, True, False, False]))
    with pytest.raises(ValueError, match="at least one real token"):
        S.from_ids(toks, torch.full((4,), -1), valid=torch.zeros(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="integer"):
        S.Segments(toks.float(), torch.full((1, 4), -1), torch.ones(1, 4, dtype=torch.bool),
                   torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        S.Segments(toks, torch.full((1, 3), -1), torch.ones(1, 4, dtype=torch.bool),
                   torch.zeros(1, 4, dtype=torch.bool))


def test_select_concat_append_causal(tiny):
    a = S.from_blocks(tiny, [["the cat", "where ?"], ["a", "b c d e f"]], ["mat", "dog"])
    first = a.select(0)
    assert first.tokens.shape[1] == int(a.valid[0].sum())  # trailing padding dropped
    again = S.concat([a.select(1), first], padding_side="left")
    assert torch.equal(again.tokens[1][again.valid[1]], a.tokens[0][a.valid[0]])
    longer = a.append(torch.tensor([[5], [6]]))
    assert longer.segment_ids[:, -1].tolist() == [-1, -1] and longer.valid[:, -1].all()
    assert torch.equal(longer.mask()[:, :, :-1, :-1], a.mask())
    plain = a.causal()
    assert (plain.segment_ids == -1).all() and torch.equal(plain.target, a.target)
    assert torch.equal(plain.mask()[0, 0], torch.ones_like(plain.mask()[0, 0]).tril() & a.valid[0])
    assert S.from_blocks(tiny, ["the"]) .str_tokens(tiny) == ["<bos>", "the"]


def test_namespace_exports():
    assert masking.segments is S
    for name in ("from_blocks", "from_delimiter", "from_chat", "from_spans", "from_ids", "Segments"):
        assert hasattr(S, name)
