"""tl_backward: read the backward pass of transformer LMs through TransformerLens hook points.

A tiny public API; every function takes the model (a ``TransformerBridge``) first:

- core: :func:`load_model`, :func:`list_models`, :func:`capture` → :class:`GradientCache`, ``metrics``
- Reversed Attention: :func:`reversed_attention`, :func:`rank_heads`, :func:`patch_attention`
- Backward Lens: :func:`gradient_factors`, :func:`backward_lens`, :func:`forward_pass_shift`,
  :func:`evaluate_edits`
- VISIT flow graphs: :func:`flow_graph`
- MAS: ``segments``, :func:`segment_mask`, :func:`mas_generate`, :func:`mas_finetune`,
  :func:`causal_finetune`

Each paper is one subpackage holding its math, result types, pictures (``render.py``) and
experiments: ``tl_backward.attention`` (Reversed Attention), ``.lens`` (Backward Lens), ``.flow``
(VISIT), ``.masking`` (MAS). ``.core`` is the model plumbing, ``.render`` the generic HTML,
``.report`` the one-prompt report, ``.zoo`` the embedded models.
"""

from .attention import HeadRanking, ReversedAttention, patch_attention, rank_heads, reversed_attention, zero_heads
from .core import metrics
from .core.capture import GradientCache, capture
from .core.loading import list_models, load_model
from .flow import FlowGraph, flow_graph
from .lens import (BackwardLens, Edit, EditEvaluation, GradientFactors, backward_lens, evaluate_edits,
                   forward_pass_shift, gradient_factors)
from .masking import Segments, causal_finetune, mas_finetune, mas_generate, segment_mask, segments

__version__ = "0.1.0"

__all__ = [
    "BackwardLens", "Edit", "EditEvaluation", "FlowGraph", "GradientCache", "GradientFactors", "HeadRanking",
    "ReversedAttention", "Segments", "backward_lens", "capture", "causal_finetune", "evaluate_edits",
    "flow_graph", "forward_pass_shift", "gradient_factors", "list_models", "load_model", "mas_finetune",
    "mas_generate", "metrics", "patch_attention", "rank_heads", "reversed_attention", "segment_mask",
    "segments", "zero_heads",
]
