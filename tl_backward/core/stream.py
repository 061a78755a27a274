"""The one forward + backward pass every analysis runs, with callbacks instead of caches.

This is the only place in tl_backward that registers backward hooks. The recipe
(checked in tests/core/test_stream.py): freeze every parameter, turn the embedding outputs into fresh
leaves, run forward and ``torch.autograd.grad`` inside ``model.hooks(...)``, and restore the
model in ``finally``. No weight gradient is computed and no parameter ``.grad`` is written.

Callbacks receive the *live* tensors: a forward activation is the very tensor autograd may save
for the backward, so keeping a reference costs nothing, and a gradient can be written straight
into a caller's buffer. :func:`tl_backward.capture` builds its cache on top of this; Reversed
Attention uses it directly to stay at the activation-gradient memory floor (benchmarks/).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .adapter import get_adapter, readout_input
from .batch import Batch
from .device import input_device
from .lock import model_lock
from .metrics import Picked, bind_metric, check_scalar

__all__ = ["Streamed", "picked_readout", "stream"]

# Where the embeddings enter; their outputs become the leaves of the backward pass.
LEAF_HOOKS = ("hook_embed", "hook_pos_embed")


@dataclass(frozen=True)
class Streamed:
    """What a :func:`stream` pass leaves besides the callbacks' side effects."""

    batch: Batch  # the input actually run (a multi-token target appended for teacher forcing)
    metric: Float[Tensor, ""]
    str_tokens: list[list[str]]
    fired: frozenset[str]  # hook names whose gradient callback fired
    leaf_grads: dict[str, Tensor]  # ∂metric/∂(embedding outputs), keyed by LEAF_HOOKS name

    def __repr__(self) -> str:
        B, T = self.batch.tokens.shape
        return (f"Streamed(batch {B} × {T} tokens, metric {float(self.metric):.4g}, {len(self.fired)} gradient "
                f"hooks fired, leaves {', '.join(self.leaf_grads)})")


def stream(
    model: Any,
    input: Any,
    metric: Any,
    *,
    on_activation: Mapping[str, Callable[[Tensor], None]] = {},
    on_gradient: Mapping[str, Callable[[Tensor], None]] = {},
    on_batch: Callable[[Batch], None] | None = None,
    on_last_logits: Callable[[Float[Tensor, "batch vocab"]], None] | None = None,
    prepend_bos: bool | None = None,
) -> Streamed:
    """Run ``model`` on ``input`` and backpropagate ``metric`` (summed over the batch) once.

    ``on_activation[name](tensor)`` gets each hook point's forward output (live and detached: do
    not modify it); ``on_gradient[name](grad)`` gets ∂metric/∂output during the backward (live:
    copy what you keep). ``on_batch(batch)`` runs first with the tokenised input (e.g. to allocate
    output buffers), ``on_last_logits(logits)`` right after the forward with the logits at each
    row's last prompt position (``[batch, vocab]``). Names must be canonical or legacy hook names of
    ``model.hook_dict``.

    A metric that reads a few positions (``target_nll``, ``logit_diff``: :class:`~tl_backward.core.metrics.Picked`)
    has only those rows (and the last positions) unembedded: the unembedding's input is gathered at
    ``adapter.readout_input`` to ``[1, n, d_model]``, unless a requested hook sits at the unembedding.
    The metric and every gradient are the same as with full logits (only the discarded rows are
    skipped). Parameters are frozen and restored, train/eval modes restored, hooks removed (also on
    error), and no parameter ``.grad`` is written.

    The whole pass (tokenising too: a fast tokenizer is reconfigured per call) holds
    ``model_lock(model)`` (:mod:`tl_backward.core.lock`): threads sharing a model run one at a time.
    """
    adapter = get_adapter(model)
    with model_lock(model):
        return _stream(model, adapter, input, metric, on_activation, on_gradient, on_batch, on_last_logits,
                       prepend_bos)


def _stream(model, adapter, input, metric, on_activation, on_gradient, on_batch, on_last_logits,
            prepend_bos) -> Streamed:
    """:func:`stream`'s body, run while the caller holds the model's lock."""
    adapter.check_model()
    for argument, names in (("on_activation", on_activation), ("on_gradient", on_gradient)):
        for name in names:
            adapter.resolve_hook(name, argument)
    batch = adapter.tokenize(input, prepend_bos)
    batch, score = bind_metric(metric, adapter, batch)
    if on_batch is not None:
        on_batch(batch)
    leaves: dict[str, Tensor] = {}
    fired: set[str] = set()

    def make_leaf(name: str) -> Callable[..., Tensor]:
        def hook(tensor: Tensor, hook: Any) -> Tensor:
            leaves[name] = tensor.detach().requires_grad_(True)
            return leaves[name]
        return hook

    def forward(fn: Callable[[Tensor], None]) -> Callable[..., None]:
        def hook(tensor: Tensor, hook: Any) -> None:
            fn(tensor.detach())
        return hook

    def backward(name: str, fn: Callable[[Tensor], None]) -> Callable[..., None]:
        def hook(grad: Tensor, hook: Any) -> None:
            fired.add(name)
            fn(grad.detach())
        return hook

    fwd_hooks = [(n, make_leaf(n)) for n in LEAF_HOOKS if n in model.hook_dict]
    fwd_hooks += [(n, forward(fn)) for n, fn in on_activation.items()]
    bwd_hooks = [(n, backward(n, fn)) for n, fn in on_gradient.items()]
    rows, positions = _readout_rows(adapter, score, batch, {*on_activation, *on_gradient})
    if rows is not None:
        fwd_hooks.append((adapter.readout_input, _gather(rows, positions)))
    with frozen(model), torch.enable_grad(), warnings.catch_warnings(), \
            model.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks):
        # Expected: the hook at a leaf fires on its output gradient (its input is frozen).
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        logits = model(batch.tokens.to(input_device(model)), return_type="logits")
        if rows is None:
            value = check_scalar(score(logits), metric)
            last = logits[torch.arange(len(batch.last), device=logits.device), batch.last.to(logits.device)]
        else:
            picked, last = logits[0].split([len(score.rows), len(batch.last)])
            value = check_scalar(score.of_picked(picked), metric)
        if on_last_logits is not None:
            on_last_logits(last.detach())
        del logits, last  # the graph keeps what the backward needs
        if not leaves:  # a model defect, not a bad argument
            raise RuntimeError("no embedding hook fired during the forward pass; cannot start the backward pass")
        grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
    return Streamed(
        batch=batch, metric=value.detach().float(), str_tokens=adapter.to_str_tokens(batch.tokens, batch.mask),
        fired=frozenset(fired), leaf_grads={k: g for k, g in zip(leaves, grads) if g is not None},
    )


def _readout_rows(adapter: Any, score: Any, batch: Batch, names: set[str]) -> tuple[Tensor | None, Tensor | None]:
    """``(rows, positions)`` to unembed: the metric's picked positions, then each row's last
    position; ``(None, None)`` (full logits) for a metric over all logits or when a requested hook
    reads the unembedding's input or output (its shape must stay ``[batch, pos, ...]``)."""
    if not isinstance(score, Picked) or names & adapter.readout_hooks or adapter.readout_input is None:
        return None, None
    return torch.cat([score.rows, torch.arange(len(batch.last))]), torch.cat([score.positions, batch.last])


@contextlib.contextmanager
def picked_readout(model: Any, rows: Int[Tensor, " n"], positions: Int[Tensor, " n"]
                   ) -> Iterator[Callable[[Tensor], Float[Tensor, "n vocab"]]]:
    """Within the block the model unembeds only ``logits[rows, positions]``; yields ``pick`` with
    ``pick(model_output_logits) = logits[rows, positions]`` (``[n, vocab]``), the same values and
    gradients (also for the weights, when training) as slicing full logits, without the other rows."""
    name = readout_input(model.hook_dict)  # fine-tuning reads no other adapter fact
    if name is None:
        yield lambda logits: logits[rows.to(logits.device), positions.to(logits.device)]
        return
    with model.hooks(fwd_hooks=[(name, _gather(rows, positions))]):
        yield lambda logits: logits[0]


def _gather(rows: Tensor, positions: Tensor) -> Callable[..., Tensor]:
    def hook(x: Float[Tensor, "batch pos d_model"], hook: Any) -> Float[Tensor, "1 n d_model"]:
        return x[rows.to(x.device), positions.to(x.device)][None]
    return hook


@contextlib.contextmanager
def frozen(model: Any) -> Iterator[None]:
    """Eval mode with every parameter frozen; restores flags and modes on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
