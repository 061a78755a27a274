"""Word-level tokenizer shared by the tiny random models and the embedded trained models.

One token per whitespace-separated word, with every punctuation character split off on its own
(``"paris."`` -> ``paris`` ``.``), except the MAS delimiter ``"###"``, which is an added token
and stays whole. Ids: ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3, then the words in the
order given. The tokenizer itself adds no special tokens; ``add_bos_token=True`` and
``name_or_path`` are set because TransformerLens 4.x reads them to decide whether to prepend
BOS, so ``bridge.to_tokens(text)`` is ``[<bos>] + tokenizer(text)``.
"""

from __future__ import annotations

from collections.abc import Sequence

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# Multi-character tokens made of punctuation that must not be split.
WHOLE_TOKENS = ("###",)


def build_tokenizer(words: Sequence[str], *, name: str = "words"):
    """A ``PreTrainedTokenizerFast`` over ``SPECIALS + words`` (duplicates dropped, order kept)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in list(SPECIALS) + list(words):
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    # WordPiece decoding with a prefix no word carries = join tokens with single spaces (a "##"
    # prefix would glue "###" to the previous word).
    core.decoder = decoders.WordPiece(prefix="\u0000", cleanup=False)
    whole = [w for w in WHOLE_TOKENS if w in vocab]
    if whole:
        core.add_tokens([AddedToken(w, normalized=False) for w in whole])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        name_or_path=name,
        add_bos_token=True,
    )


def encode(tokenizer, text: str, *, prepend_bos: bool = True) -> list[int]:
    """Token ids of ``text`` with BOS prepended (the Bridge's default convention)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if prepend_bos else []) + list(ids)
