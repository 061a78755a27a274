"""Where a model lives: the one place that reads a model's devices and dtype.

A model may be dispatched over several devices (Hugging Face ``device_map``, TransformerLens
``n_devices``): its blocks then sit on different GPUs and every hook sees tensors on its own
block's device. The rules every analysis follows:

* **inputs** (token ids, masks, segment ids) go to :func:`input_device`, the device of the input
  embedding (where the forward starts; TransformerLens's ``cfg.device`` under a split);
* **hook-time work** happens on the hooked tensor's device: anything combined with it (a mask, a
  patch, a scale) is moved there with :func:`on` first;
* **cross-layer results** (``[layer, ...]`` stacks) are gathered on one device,
  :func:`result_device` (= :func:`input_device`, so a single-device model keeps its results where
  they were computed) by :func:`stack_on` / :func:`cat_on`;
* the **dtype** of the model's weights is :func:`param_dtype`; a module's own device is
  :func:`module_device` (e.g. the final norm, wherever the last block lives).

No other module calls ``next(model.parameters())`` or reads a model's ``.device``
(``device_reads`` in tests/layout.py checks the source).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["cat_on", "declared_device", "input_device", "model_devices", "module_device", "on", "param_dtype",
           "result_device", "stack_on"]

_CPU = torch.device("cpu")


def module_device(module: Any) -> torch.device:
    """Device of ``module``'s first parameter (first buffer if it has none; CPU if neither)."""
    for tensors in (module.parameters(), module.buffers()):
        for t in tensors:
            return t.device
    return _CPU


def _input_embedding(model: Any) -> Any:
    """The input embedding module: a bridge's ``embed``, an HF module's ``get_input_embeddings()``."""
    embed = getattr(model, "embed", None)
    if isinstance(embed, torch.nn.Module):
        return embed
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            embed = getter()
        except NotImplementedError:  # an HF base class without embeddings
            embed = None
        if isinstance(embed, torch.nn.Module):
            return embed
    return None


def input_device(model: Any) -> torch.device:
    """Where the forward pass starts: the input embedding's device (``model``'s first parameter's
    for a module without a recognisable embedding). Token ids and masks are moved here."""
    embed = _input_embedding(model)
    return module_device(model if embed is None else embed)


def result_device(model: Any) -> torch.device:
    """The one device ``[layer, ...]`` results of ``model`` are gathered on: :func:`input_device`."""
    return input_device(model)


def declared_device(model: Any) -> torch.device:
    """The device a bridge's config records (``cfg.device``); TransformerLens may record one it did
    not apply, so :func:`tl_backward.core.loading.load_model` checks it against the parameters."""
    return torch.device(model.cfg.device)


def model_devices(model: Any) -> tuple[torch.device, ...]:
    """The distinct devices of ``model``'s parameters, in parameter order (one for an undispatched model)."""
    return tuple(dict.fromkeys(p.device for p in model.parameters()))


def param_dtype(model: Any) -> torch.dtype:
    """The dtype of ``model``'s floating-point weights (its first floating parameter; fp32 if none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def on(x: Tensor, ref: Tensor | torch.device | str) -> Tensor:
    """``x`` on ``ref``'s device (``ref`` a tensor or a device); ``x`` itself when already there."""
    device = ref.device if isinstance(ref, Tensor) else torch.device(ref)
    return x if x.device == device else x.to(device)


def stack_on(tensors: Sequence[Tensor], device: torch.device | str | None = None, dim: int = 0) -> Tensor:
    """``torch.stack`` of per-layer tensors that may sit on different devices, on ``device``
    (None: the first tensor's). Tensors already there are not copied before the stack."""
    device = _target(tensors, device)
    return torch.stack([on(t, device) for t in tensors], dim)


def cat_on(tensors: Sequence[Tensor], device: torch.device | str | None = None, dim: int = 0) -> Tensor:
    """``torch.cat`` counterpart of :func:`stack_on`."""
    device = _target(tensors, device)
    return torch.cat([on(t, device) for t in tensors], dim)


def _target(tensors: Sequence[Tensor], device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return tensors[0].device if len(tensors) else _CPU
