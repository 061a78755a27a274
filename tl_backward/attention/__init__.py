"""Reversed Attention: the backward pass's attention maps, head ranking, and attention patching."""

from .aggregate import MeanAccumulator, mean_over
from .patching import patch_attention, zero_heads
from .ranking import HeadRanking, rank_heads
from .reversed import ReversedAttention, frobenius, reversed_attention, reversed_attention_from

__all__ = ["HeadRanking", "MeanAccumulator", "ReversedAttention", "frobenius", "mean_over",
           "patch_attention", "rank_heads", "reversed_attention", "reversed_attention_from", "zero_heads"]
