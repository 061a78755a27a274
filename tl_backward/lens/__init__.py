"""Backward Lens (Katz et al., EMNLP 2024): low-rank weight-gradient factors, their projection into
the vocabulary, imprint/shift of one-token SGD steps, and Forward Pass Shift editing."""

from .backward_lens import BackwardLens, ImprintShift, LensReadout, backward_lens, lens_from_factors, project_factors
from .editing import Edit, forward_pass_shift
from .experts import ExpertLens, expert_lens
from .evaluation import EditEvaluation, continuation_correct, evaluate_edits
from .factors import (MODULES, Factor, FactorNorms, FactorSVD, GradientFactors, factor_hook_names, factors_from_cache,
                      gradient_factors)
from .projection import VocabReadout, vocab_readout

__all__ = [
    "BackwardLens", "Edit", "EditEvaluation", "ExpertLens", "expert_lens", "Factor", "FactorNorms", "FactorSVD", "GradientFactors",
    "ImprintShift", "LensReadout", "factor_hook_names", "factors_from_cache", "lens_from_factors", "MODULES", "VocabReadout", "backward_lens", "continuation_correct",
    "evaluate_edits", "forward_pass_shift", "gradient_factors", "project_factors", "vocab_readout",
]
