"""The one token-id decoder (``tl_backward.core.tokens.decode_ids``, re-exported by ``core.adapter``)
that every display string goes through: adapter, Backward Lens, flow graphs, findings, segments and the report."""

import torch

from tl_backward.core.adapter import decode_ids, get_adapter
from tl_backward.lens import backward_lens
from tl_backward.masking.segments import from_ids


def test_decode_ids_is_the_tokenizers_own_decode(gpt2_model):
    tok = gpt2_model.tokenizer
    ids = torch.arange(gpt2_model.W_U.shape[-1])
    expected = [tok.decode([i]) for i in ids.tolist()]
    assert decode_ids(tok, ids) == expected
    assert decode_ids(tok, ids.reshape(2, -1)) == expected  # any shape, flattened
    assert get_adapter(gpt2_model).decode_ids(ids.tolist()) == expected
    assert decode_ids(tok, []) == []


def test_decode_ids_without_tokenizer_or_batch_decode():
    assert decode_ids(None, torch.tensor([[3, 0]])) == ["3", "0"]

    class DecodeOnly:  # a tokenizer-like object with decode only
        def decode(self, ids):
            return f"<{ids[0]}>"

    assert decode_ids(DecodeOnly(), [5, 7]) == ["<5>", "<7>"]


def test_every_caller_decodes_alike(gpt2_model):
    ad = get_adapter(gpt2_model)
    tok = gpt2_model.tokenizer
    batch = ad.tokenize(["the capital of", "a"])
    strs = ad.to_str_tokens(batch.tokens, batch.mask)
    assert strs == [[tok.decode([int(t)]) for t in row] for row in batch.rows()]
    seg = from_ids(batch.tokens[:1], torch.zeros_like(batch.tokens[:1]))
    assert seg.str_tokens(gpt2_model) == [tok.decode([int(t)]) for t in batch.tokens[0]]
    lens = backward_lens(gpt2_model, "the capital of", " paris", layers=0)
    ids = lens["mlp_out"].bottom_ids[0, -1]
    assert lens.decode(ids) == [tok.decode([int(i)]) for i in ids]
