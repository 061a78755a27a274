"""The one encoding path (``tl_backward/core/tokens.py`` behind ``ModelAdapter.encode``/``bos_ids``/
``pad_id``): ids and offsets equal the tokenizer's own, and the MAS text builders go through it."""

import pytest

from tl_backward.core.adapter import get_adapter
from tl_backward.errors import TLBackwardError
from tl_backward.masking import segments as S

TEXT = "the capital of France ### is Paris"  # some words are unknown to the tiny vocabulary: fine


def test_encode_is_the_tokenizers_own(model):
    ad, tok = get_adapter(model), model.tokenizer
    direct = tok(TEXT, add_special_tokens=False, return_offsets_mapping=True)
    assert ad.encode(TEXT) == list(direct["input_ids"])
    ids, offsets = ad.encode(TEXT, offsets=True)
    assert ids == list(direct["input_ids"])
    assert offsets == [tuple(o) for o in direct["offset_mapping"]]


def test_bos_ids_and_pad_id(model):
    ad, tok = get_adapter(model), model.tokenizer
    assert ad.bos_ids(True) == [tok.bos_token_id]
    assert ad.bos_ids(False) == []
    with pytest.raises(TLBackwardError) as err:
        ad.bos_ids("yes")
    assert err.value.argument == "prepend_bos"
    expected_pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    assert ad.pad_id == expected_pad


def test_text_builders_tokenise_through_the_adapter(model):
    ad = get_adapter(model)
    seg = S.from_delimiter(model, TEXT, answer=" yes", padding_side="left")
    assert seg.tokens[0].tolist() == ad.bos_ids(True) + ad.encode(TEXT) + ad.encode(" yes")
    blocks = S.from_blocks(model, [["the cat", " sat"], ["a"]], ["on", "b"])
    assert blocks.tokens[1, blocks.valid[1]].tolist() == ad.bos_ids(True) + ad.encode("a") + ad.encode("b")
    assert (blocks.tokens[1, ~blocks.valid[1]] == ad.pad_id).all()
