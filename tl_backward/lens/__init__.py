"""Backward Lens: low-rank weight-gradient factors, their vocabulary projection, and FPS editing."""

from .backward_lens import BackwardLens, ImprintShift, LensReadout, backward_lens
from .factors import Factor, FactorNorms, FactorSVD, GradientFactors, gradient_factors
from .projection import VocabReadout, vocab_readout

__all__ = ["BackwardLens", "Factor", "FactorNorms", "FactorSVD", "GradientFactors", "ImprintShift",
           "LensReadout", "VocabReadout", "backward_lens", "gradient_factors", "vocab_readout"]
