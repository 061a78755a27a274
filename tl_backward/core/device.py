"""Where a model lives: the one device lookup every analysis uses.

A model's device is the device of its first parameter (a Bridge and the HF module it wraps share
their parameters). Inputs are moved there; results come back to the CPU where documented.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["device_of"]


def device_of(model: Any) -> torch.device:
    """``torch.device`` of ``model``'s parameters (CPU for a module without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - every bridge has parameters
        return torch.device("cpu")
