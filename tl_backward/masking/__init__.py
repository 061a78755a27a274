"""Segment-based attention masking (MAS): segments, the mask rule, hooks, generation, fine-tuning."""

from . import segments
from .context import attention_patterns, segment_mask
from .finetune import (FinetuneResult, answer_loss, causal_finetune, finetune, mas_finetune, preserving_weights,
                       restore_weights, snapshot_weights)
from .generate import Generation, mas_generate
from .segments import Segments

__all__ = [
    "segments",
    "Segments",
    "segment_mask",
    "attention_patterns",
    "mas_generate",
    "Generation",
    "mas_finetune",
    "causal_finetune",
    "finetune",
    "answer_loss",
    "preserving_weights",
    "snapshot_weights",
    "restore_weights",
    "FinetuneResult",
]
