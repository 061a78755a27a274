"""Reversed Attention: the backward pass's attention maps, head ranking, and attention patching."""

from .aggregate import MeanAccumulator, mean_over
from .patching import patch_attention, zero_heads
from .ranking import HeadRanking, rank_heads
from .reduced import RANorms, RATopK
from .reversed import (ReversedAttention, frobenius, ra_hook_names, reversed_attention, reversed_attention_from,
                       reversed_attention_from_cache)

__all__ = ["HeadRanking", "MeanAccumulator", "RANorms", "RATopK", "ReversedAttention", "frobenius", "mean_over",
           "patch_attention", "ra_hook_names", "rank_heads", "reversed_attention", "reversed_attention_from",
           "reversed_attention_from_cache", "zero_heads"]
