"""One forward and one backward pass, keeping activations and metric gradients at chosen hooks.

Built on :func:`tl_backward.core.stream.stream` (the single forward + backward with frozen
weights and leaves at the embeddings); this module decides *which* hooks to read for a requested
name and copies what they carry into a :class:`GradientCache`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .adapter import ModelAdapter, get_adapter
from .stream import stream

Names = Sequence[str] | Callable[[str], bool]
# Hook points TransformerLens only provides after a set_use_* flag; filters skip them.
_GATED = re.compile(r"hook_(result|q_input|k_input|v_input|attn_in|mlp_in)$")
_RESID_MID = re.compile(r"^blocks\.(\d+)\.hook_resid_mid$")


@dataclass(frozen=True)
class GradientCache:
    """Activations and metric gradients from one :func:`capture`, keyed by the requested names.

    Mirrors TransformerLens's ``ActivationCache``: ``cache[name]`` is the activation,
    ``cache[name + "_grad"]`` (or ``cache.gradients[name]``) is ∂metric/∂activation. Tensors are
    detached and fp32 (upcast from bf16/fp16 models); like ``ActivationCache``, fp32 activations
    are the forward tensors themselves (not copies), gradients are copies. ``last_logits`` holds the model's logits at
    each row's last prompt position (its prediction there), ``last`` those positions.
    """

    activations: dict[str, Tensor]
    gradients: dict[str, Tensor]
    metric: Float[Tensor, ""]
    tokens: Int[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos"]
    last: Int[Tensor, " batch"]
    str_tokens: list[list[str]]
    last_logits: Float[Tensor, "batch d_vocab"] | None = None
    canonical: dict[str, str] = field(default_factory=dict, repr=False)

    def __getitem__(self, name: str) -> Tensor:
        if name in self.activations:
            return self.activations[name]
        if name.endswith("_grad") and name[: -len("_grad")] in self.gradients:
            return self.gradients[name[: -len("_grad")]]
        raise KeyError(f"{name!r} was not captured; captured: {sorted(self.activations)}")

    def __contains__(self, name: object) -> bool:
        return name in self.activations

    def keys(self) -> list[str]:
        return list(self.activations)

    def grad(self, name: str) -> Tensor:
        """∂metric/∂(activation at ``name``)."""
        return self[name + "_grad"]

    def to(self, device: str | torch.device) -> "GradientCache":
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return GradientCache(move(self.activations), move(self.gradients), self.metric.to(device),
                             self.tokens.to(device), self.mask.to(device), self.last.to(device),
                             self.str_tokens, self.last_logits.to(device), self.canonical)

    def _find(self, legacy: str, canonical: str) -> str | None:
        if legacy in self.gradients:
            return legacy
        return next((k for k, c in self.canonical.items() if c == canonical and k in self.gradients), None)

    def resid_grads(self, kind: str = "pre", model: Any = None) -> Float[Tensor, "layer batch pos d_model"]:
        """Stacked residual-stream gradients for ``kind`` in {"pre", "mid", "post"}, all layers."""
        if kind not in ("pre", "mid", "post"):
            raise ValueError(f"kind must be 'pre', 'mid' or 'post', got {kind!r}")
        pattern = re.compile(rf"^blocks\.(\d+)\.hook_resid_{kind}$")
        found = sorted((int(m.group(1)), k) for k in self.gradients if (m := pattern.match(k)))
        if not found:
            raise KeyError(
                f"no hook_resid_{kind} gradients were captured: pass "
                f"names=lambda n: n.endswith('hook_resid_{kind}') to capture()"
            )
        layers = [l for l, _ in found]
        if layers != list(range(len(layers))):
            raise KeyError(f"hook_resid_{kind} was captured for layers {layers} only; capture every layer")
        return torch.stack([self.gradients[k] for _, k in found])


@dataclass(frozen=True)
class _Request:
    name: str  # as the caller wrote it
    fwd: str  # canonical hook whose forward output is the activation
    bwd: str  # canonical hook whose backward gradient is the full gradient


def capture(
    model: Any,
    input: Any,
    metric: Any,
    *,
    names: Names,
    prepend_bos: bool | None = None,
) -> GradientCache:
    """Run one forward and one backward pass and keep, for each hook in ``names``, the
    activation ``a`` and ``∂metric/∂a``.

    Args:
        model: a reconstructing ``TransformerBridge`` (GPT-2, GPT-NeoX, Llama/Qwen2/Mistral).
        input: a string, a list of strings (right-padded; each row's loss sits at its own last
            real token) or token ids ``[batch, pos]``.
        metric: ``tl_backward.metrics.target_nll(...)``/``logit_diff(...)`` or any callable
            ``(logits [batch, pos, vocab], tokens [batch, pos]) -> scalar``. Batches are summed.
        names: hook names (legacy aliases like ``blocks.0.hook_resid_mid`` or canonical names) or
            a filter ``name -> bool`` over ``model.hook_dict``. Only these are cached.
        prepend_bos: None uses the model's default.

    ``blocks.L.hook_resid_mid`` reports the *full* residual gradient (TransformerLens's alias,
    ``ln2.hook_in``, sees only the layer-norm branch); other names report the gradient at that
    hook point's output.

    The model is left as found: parameters' ``requires_grad``, train/eval mode and hooks are
    restored (also on error), and no parameter ``.grad`` is written.
    """
    adapter = get_adapter(model)
    requests = _plan(adapter, names)
    acts: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}
    last_logits: list[Tensor] = []

    def keep(store: dict[str, Tensor], key: str, copy: bool) -> Callable[[Tensor], None]:
        def fn(tensor: Tensor) -> None:
            # Activations are kept by reference, as ActivationCache does: autograd saves most of
            # them anyway. Gradients are copied: autograd may reuse a gradient buffer in place.
            # float() upcasts bf16/fp16 (a copy already).
            if tensor.dtype != torch.float32:
                store[key] = tensor.float()
            else:
                store[key] = tensor.clone() if copy else tensor
        return fn

    def keep_last(logits: Tensor, batch: Any) -> None:
        rows = torch.arange(len(batch.last), device=logits.device)
        last_logits.append(logits[rows, batch.last.to(logits.device)].float())

    run = stream(
        model, input, metric, prepend_bos=prepend_bos, on_logits=keep_last,
        on_activation={fwd: keep(acts, fwd, False) for fwd in dict.fromkeys(r.fwd for r in requests)},
        on_gradient={bwd: keep(grads, bwd, True) for bwd in dict.fromkeys(r.bwd for r in requests)},
    )
    for key, g in run.leaf_grads.items():
        # The hook at a leaf itself may not fire (caveat 3 of the spec); backfill it.
        grads.setdefault(key, g.detach().float())
    missing = [r.name for r in requests if r.bwd not in grads]
    if missing:
        raise ValueError(
            f"no gradient reached {missing}: these hook points are not on the autograd path from the "
            "embeddings to the metric"
        )
    batch = run.batch
    return GradientCache(
        activations={r.name: acts[r.fwd] for r in requests},
        gradients={r.name: grads[r.bwd] for r in requests},
        metric=run.metric,
        tokens=batch.tokens,
        mask=batch.mask,
        last=batch.last,
        str_tokens=run.str_tokens,
        last_logits=last_logits[0],
        canonical={r.name: r.fwd for r in requests},
    )


def _plan(adapter: ModelAdapter, names: Names) -> list[_Request]:
    """Resolve requested names to (forward hook, backward hook) pairs on canonical names."""
    from transformer_lens.model_bridge.bridge_core import build_alias_to_canonical_map

    hook_dict = adapter.model.hook_dict
    if callable(names) and not isinstance(names, str):
        chosen = [n for n in hook_dict if not _GATED.search(n) and names(n)]
        if not chosen:
            raise ValueError("the names filter matched no hook point")
    elif isinstance(names, str):
        chosen = [names]
    else:
        chosen = list(names)
        if not chosen:
            raise ValueError("names is empty: list the hook points to capture")
    alias = build_alias_to_canonical_map(hook_dict)
    requests = []
    for name in chosen:
        adapter.resolve_hook(name)
        canonical = alias.get(name, name)
        bwd = canonical
        mid = _RESID_MID.match(name)
        if mid:
            # resid_mid = resid_pre + attn_out feeds both LN2 and the skip connection; the
            # gradient at attn_out is the full one (the alias's backward hook sees LN2 only).
            attn_out = f"blocks.{mid.group(1)}.hook_attn_out"
            bwd = alias.get(attn_out, attn_out)
        requests.append(_Request(name=name, fwd=canonical, bwd=bwd))
    return requests
