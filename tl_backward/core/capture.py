"""One forward and one backward pass, keeping activations and metric gradients at chosen hooks.

Built on :func:`tl_backward.core.stream.stream` (the single forward + backward with frozen
weights and leaves at the embeddings); this module decides *which* hooks to read for a requested
name and copies what they carry into a :class:`GradientCache`, which is read like TransformerLens's
``ActivationCache`` (same key forms, resolved with TransformerLens's own ``get_act_name``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_backward.errors import TLBackwardError

from . import checks
from .adapter import ModelAdapter, get_adapter
from .compat import ActivationCache, build_alias_to_canonical_map, get_act_name
from .device import result_device, stack_on
from .stream import stream

Names = Sequence[str] | Callable[[str], bool] | None
# Hook points TransformerLens only provides after a set_use_* flag; filters skip them.
_GATED = re.compile(r"hook_(result|q_input|k_input|v_input|attn_in|mlp_in)$")
_RESID_MID = re.compile(r"^blocks\.(\d+)\.hook_resid_mid$")
# The LayerNorm scales TransformerLens's LN helpers divide by (see GradientCache.gradient_cache).
_LN_SCALE = re.compile(r"(^|\.)hook_scale$")
_KEY_FORMS = ("a hook name ('blocks.0.attn.hook_pattern'), a TransformerLens shorthand ('pattern0'), "
              "or a tuple (name, layer[, layer_type]) like ('pattern', 0); add '_grad' to the name "
              "for the gradient")


@dataclass(frozen=True, repr=False)
class GradientCache(Mapping):
    """Activations and metric gradients from one :func:`capture`, read like TransformerLens's
    ``ActivationCache``.

    Keys are the hook names as requested (legacy like ``blocks.0.attn.hook_pattern`` or canonical
    like ``blocks.0.hook_in``); ``len``, iteration, ``keys()``, ``values()`` and ``items()`` run
    over them and their activations. Lookups accept TransformerLens's key forms, resolved with
    ``transformer_lens.utilities.get_act_name``, and any other name of the same hook point:

    * ``cache["blocks.0.attn.hook_pattern"]``, ``cache["pattern", 0]``, ``cache["q", 1, "attn"]``,
      ``cache["resid_pre", -1]`` (negative layers count from the end), ``cache["k1"]``:
      the activation ``a``;
    * the same key with ``_grad`` on the name (``cache["pattern_grad", 0]``,
      ``cache["blocks.0.attn.hook_pattern_grad"]``, TransformerLens's ``incl_bwd`` spelling), or
      ``cache.grad("pattern", 0)``: ``∂metric/∂a``, same shape as ``a``.

    :meth:`activation_cache` / :meth:`gradient_cache` give real ``ActivationCache`` objects for
    TransformerLens's utilities (``stack_activation``, ``accumulated_resid``, ``decompose_resid``,
    ``apply_ln_to_stack``, ``logit_attrs``, …).

    Tensors are detached and fp32 (upcast from bf16/fp16 models); like ``ActivationCache``, fp32
    activations are the forward tensors themselves (not copies), gradients are copies.
    ``last_logits`` holds the model's logits at each row's last prompt position (its prediction
    there), ``last`` those positions.
    """

    activations: dict[str, Tensor]
    gradients: dict[str, Tensor]
    metric: Float[Tensor, ""]
    tokens: Int[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos"]
    last: Int[Tensor, " batch"]
    str_tokens: list[list[str]]
    last_logits: Float[Tensor, "batch d_vocab"] | None = None
    # Every hook name of the model that reads a captured hook point -> the captured key serving it
    # (for activations, and for gradients: hook_resid_mid's gradient differs from ln2.hook_in's).
    act_names: dict[str, str] = field(default_factory=dict, compare=False)
    grad_names: dict[str, str] = field(default_factory=dict, compare=False)
    model: Any = field(default=None, compare=False)

    def __repr__(self) -> str:
        B, T = self.tokens.shape
        return f"GradientCache({len(self)} hooks, batch {B} × {T} tokens, metric {float(self.metric):.4g})"

    # ------------------------------------------------------------------ mapping (ActivationCache-like)
    def __getitem__(self, key: Any) -> Tensor:
        name, want_grad = self._resolve(key)
        return self.gradients[name] if want_grad else self.activations[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.activations)

    def __len__(self) -> int:
        return len(self.activations)

    def keys(self):
        """The captured hook names, as requested."""
        return self.activations.keys()

    def values(self):
        """The activations, in :meth:`keys` order."""
        return self.activations.values()

    def items(self):
        """``(name, activation)`` pairs; ``self.gradients.items()`` gives the gradients."""
        return self.activations.items()

    def grad(self, name: Any, layer: int | None = None, layer_type: str | None = None) -> Tensor:
        """∂metric/∂(activation): ``cache.grad("blocks.0.attn.hook_pattern")``, ``cache.grad("pattern", 0)``."""
        key = name if layer is None and layer_type is None else (name, layer, layer_type)
        resolved, _ = self._resolve(key, grad=True)
        return self.gradients[resolved]

    def _resolve(self, key: Any, grad: bool = False) -> tuple[str, bool]:
        """(captured key, whether the gradient is meant) for any accepted key form."""
        if isinstance(key, str):
            base, grad = _strip_grad(key, grad)
            name = base if base in self.activations else _act_name(key, (base,))
        elif isinstance(key, tuple) and key and isinstance(key[0], str):
            base, grad = _strip_grad(key[0], grad)
            rest = list(key[1:])
            if rest and checks.is_int(rest[0]):
                rest[0] = self._layer(key, int(rest[0]))
            name = _act_name(key, (base, *rest))
        else:
            raise KeyError(f"cache keys are {_KEY_FORMS}; got {key!r}")
        served = (self.grad_names if grad else self.act_names).get(name, name)
        if served not in self.activations:
            raise KeyError(f"{key!r} (= {name!r}) was not captured; captured: {list(self.activations)}. "
                           "Add it to capture(names=...), or pass names=None for every hook point")
        return served, grad

    def _layer(self, key: Any, layer: int) -> int:
        """``layer`` of a key, negative counting from the end (core/checks.py's convention)."""
        if self.model is None:
            if layer < 0:
                raise KeyError(f"{key!r}: negative layers need the model, which this cache does not hold")
            return layer
        n = int(self.model.cfg.n_layers)
        if not -n <= layer < n:
            raise KeyError(f"{key!r}: layer {layer} is out of range: the model has layers 0..{n - 1} "
                           f"(or -{n}..-1 from the end)")
        return layer % n

    # ------------------------------------------------------------------ TransformerLens caches
    def activation_cache(self) -> ActivationCache:
        """The activations as a TransformerLens ``ActivationCache`` (batch dim kept).

        Holds every hook name of a captured hook point (legacy and canonical, as
        ``model.run_with_cache`` does), so ``cache["resid_pre", 0]``, ``stack_activation``,
        ``accumulated_resid``, ``decompose_resid``, ``apply_ln_to_stack`` and ``logit_attrs`` work as
        on ``run_with_cache``'s cache, given the hooks they read were captured. Tensors are shared.
        """
        return ActivationCache(self._tl_dict(self.act_names, self.activations), self._tl_model())

    def gradient_cache(self) -> ActivationCache:
        """The gradients as a TransformerLens ``ActivationCache``: each hook name maps to
        ``∂metric/∂(activation)``, so its utilities stack and decompose gradients
        (``stack_activation("pattern")`` → ``[layer, batch, head, q, k]`` pattern gradients,
        ``accumulated_resid()`` → residual gradients per layer, ``decompose_resid()`` → the
        gradient reaching each component's output).

        One exception, kept so that the LayerNorm helpers stay meaningful: ``*.hook_scale`` holds
        the *forward* LN scale, which ``apply_ln_to_stack`` (and ``logit_attrs``, ``apply_ln=True``)
        divide by. With the scale held fixed the LN is the symmetric linear map ``x ↦ (x − mean x)/s``,
        so applying it to a stack of gradients at the LN's output gives their pull-back to its input
        (before γ). The scale's own gradient stays at ``GradientCache.grad("scale", l, "ln1")``.
        """
        grads = self._tl_dict(self.grad_names, self.gradients)
        scales = self._tl_dict(self.act_names, self.activations)
        grads.update({n: scales[n] for n in grads if _LN_SCALE.search(n) and n in scales})
        return ActivationCache(grads, self._tl_model())

    def _tl_dict(self, names: dict[str, str], store: dict[str, Tensor]) -> dict[str, Tensor]:
        out = dict(store)
        out.update({alias: store[key] for alias, key in names.items() if key in store})
        return out

    def _tl_model(self) -> Any:
        if self.model is None:
            raise TLBackwardError("this GradientCache holds no model; build it with capture()", argument="model")
        return self.model

    # ------------------------------------------------------------------ other
    def to(self, device: str | torch.device) -> "GradientCache":
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        logits = None if self.last_logits is None else self.last_logits.to(device)
        return GradientCache(move(self.activations), move(self.gradients), self.metric.to(device),
                             self.tokens.to(device), self.mask.to(device), self.last.to(device),
                             self.str_tokens, logits, self.act_names, self.grad_names, self.model)

    def resid_grads(self, kind: str = "pre", model: Any = None) -> Float[Tensor, "layer batch pos d_model"]:
        """Stacked residual-stream gradients for ``kind`` in {"pre", "mid", "post"}, all layers."""
        checks.one_of(kind, "kind", ("pre", "mid", "post"))
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
        if self.model is not None and len(layers) != int(self.model.cfg.n_layers):
            raise KeyError(f"hook_resid_{kind} was captured for layers {layers} only, the model has "
                           f"{int(self.model.cfg.n_layers)}; capture every layer")
        device = None if self.model is None else result_device(self.model)  # layers may sit on several devices
        return stack_on([self.gradients[k] for _, k in found], device)


def _strip_grad(name: str, grad: bool) -> tuple[str, bool]:
    if name.endswith("_grad"):
        return name[: -len("_grad")], True
    return name, grad


def _act_name(key: Any, parts: tuple) -> str:
    try:
        return get_act_name(*parts)
    except Exception as err:  # get_act_name has no input checks of its own
        raise KeyError(f"cache keys are {_KEY_FORMS}; got {key!r}") from err


@dataclass(frozen=True)
class _Request:
    name: str  # as the caller wrote it
    fwd: str  # canonical hook whose forward output is the activation
    bwd: str  # canonical hook whose backward gradient is the full gradient
    # A derived point (adapter.derived_hooks): its activation is derive(activation at fwd); no gradient.
    derive: Callable[[Tensor], Tensor] | None = None


def capture(
    model: Any,
    input: Any,
    metric: Any,
    *,
    names: Names = None,
    names_filter: Names = None,
    prepend_bos: bool | None = None,
) -> GradientCache:
    """Run one forward and one backward pass and keep, for each hook in ``names``, the
    activation ``a`` and ``∂metric/∂a``.

    Args:
        model: a reconstructing ``TransformerBridge`` (GPT-2, GPT-NeoX, Llama/Qwen2/Mistral), or on
            TransformerLens < 4 a ``HookedTransformer``.
        input: a string, a list of strings (right-padded; each row's loss sits at its own last
            real token) or token ids ``[batch, pos]``.
        metric: ``tl_backward.metrics.target_nll(...)``/``logit_diff(...)`` or any callable
            ``(logits [batch, pos, vocab], tokens [batch, pos]) -> scalar``. Batches are summed.
        names: a hook name or a list of them (legacy aliases like ``blocks.0.hook_resid_mid`` or
            canonical names; each must receive a gradient), a filter ``name -> bool`` over
            ``model.hook_dict``, or None (default) for every hook point, as ``run_with_cache``.
            Filters and None skip gated hook points (``hook_result``, ``hook_q_input``, … need a
            ``set_use_*`` flag), hook points that carry no gradient (token/position ids, hooks
            that never fire) and hook points whose tensor is not what their name says
            (``hook_attn_scores`` on the generic, HF-delegating attention bridge: GPT-J, OPT,
            GPT-Neo; asked for by name it is refused).
            Cost: memory ≈ one activation + one gradient per distinct hook point
            (a legacy alias shares its canonical hook's tensors), about twice ``run_with_cache``.
        names_filter: TransformerLens's spelling of ``names``; pass one or the other.
        prepend_bos: None uses the model's default.

    ``blocks.L.hook_resid_mid`` reports the *full* residual gradient (TransformerLens's alias,
    ``ln2.hook_in``, sees only the layer-norm branch); other names report the gradient at that
    hook point's output (summed over its calls where the model calls one hook point several times on
    one value: ``adapter.summed_grad_hooks``, HookedTransformer's ``ln1``). Every per-token tensor comes
    ``[batch, pos, …]``, also the norm hooks TransformerLens fires flattened ``[batch·pos, …]`` (OPT's
    ``ln2.hook_normalized`` / ``hook_scale``, ``ModelAdapter.flattened_hooks``). Explicit names may also be
    an adapter's derived points (``adapter.derived_hooks``, e.g. a HookedTransformer's
    ``blocks.L.ln1.hook_out`` = ``hook_normalized · w + b``), whose gradient, where the adapter declares
    one (``adapter.derived_grads``), is computed from the gradients of the hooks it lists.

    The model is left as found: parameters' ``requires_grad``, train/eval mode and hooks are
    restored (also on error), and no parameter ``.grad`` is written.
    """
    argument = "names"
    if names_filter is not None:
        if names is not None:
            raise TLBackwardError("pass names= or names_filter= (the same thing, TransformerLens's "
                                  "spelling), not both", argument="names_filter")
        names, argument = names_filter, "names_filter"
    adapter = get_adapter(model)
    aliases = build_alias_to_canonical_map(model.hook_dict)
    requests, strict = _plan(adapter, aliases, names, argument)
    acts: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}
    last_logits: list[Tensor] = []

    def keep(store: dict[str, Tensor], key: str, copy: bool, summed: bool = False) -> Callable[[Tensor], None]:
        def fn(tensor: Tensor) -> None:
            # Activations are kept by reference, as ActivationCache does: autograd saves most of
            # them anyway. Gradients are copied: autograd may reuse a gradient buffer in place.
            # float() upcasts bf16/fp16 (a copy already).
            if tensor.dtype != torch.float32:
                value = tensor.float()
            else:
                value = tensor.clone() if copy else tensor
            # A hook point the model calls several times on one value (adapter.summed_grad_hooks, e.g.
            # HookedTransformer's ln1 for q, k and v): its gradient is the sum over the calls.
            store[key] = store[key] + value if summed and key in store else value
        return fn

    # Derived points with a gradient (adapter.derived_grads): the hooks it is computed from are kept too.
    derived = {r.bwd: adapter.derived_grads[r.bwd] for r in requests if r.derive and r.bwd in adapter.derived_grads}
    fwds = [*(r.fwd for r in requests), *(aliases.get(n, n) for reads, _, _ in derived.values() for n in reads)]
    bwds = [*(r.bwd for r in requests if r.derive is None),
            *(aliases.get(n, n) for _, reads, _ in derived.values() for n in reads)]
    run = stream(
        model, input, metric, prepend_bos=prepend_bos, on_last_logits=lambda x: last_logits.append(x.float()),
        on_activation={fwd: keep(acts, fwd, False) for fwd in dict.fromkeys(fwds)},
        on_gradient={bwd: keep(grads, bwd, True, bwd in adapter.summed_grad_hooks) for bwd in dict.fromkeys(bwds)},
    )
    flat = {aliases.get(n, n) for n in adapter.flattened_hooks}
    for store in (acts, grads):
        _unflatten(store, flat, tuple(run.batch.tokens.shape))
    for key, g in run.leaf_grads.items():
        # The hook at a leaf itself may not fire (TransformerLens does not fire a leaf's own backward hook); backfill it.
        grads.setdefault(key, g.detach().float())
    # Hook points that fire after the model used their tensor (generic bridges' hook_pattern) carry
    # values but, truthfully, no gradient: kept activation-only.
    values_only = {aliases.get(n, n) for n in adapter.values_only_hooks}
    acts.update({r.name: r.derive(acts[r.fwd]) for r in requests if r.derive is not None and r.fwd in acts})
    grads.update({name: fn(acts, grads) for name, (a_reads, g_reads, fn) in derived.items()
                  if all(n in acts for n in a_reads) and all(n in grads for n in g_reads)})
    missing = [r.name for r in requests if r.fwd not in acts or (r.bwd not in grads and r.bwd not in values_only)]
    if missing and strict:
        raise TLBackwardError(
            f"{argument}: no gradient reached {missing}: these hook points are not on the autograd path from "
            "the embeddings to the metric", argument=argument)
    requests = [r for r in requests if r.name not in missing]
    if not requests:
        raise TLBackwardError(f"no hook point chosen by {argument} received a gradient: choose hook points "
                              "between the embeddings and the logits", argument=argument)
    batch = run.batch
    return GradientCache(
        activations={r.name: acts[r.name if r.derive else r.fwd] for r in requests},
        gradients={r.name: grads[r.bwd] for r in requests if r.bwd in grads},
        metric=run.metric,
        tokens=batch.tokens,
        mask=batch.mask,
        last=batch.last,
        str_tokens=run.str_tokens,
        last_logits=last_logits[0],
        **_served_names(model.hook_dict, aliases, requests),
        model=model,
    )


def _unflatten(store: dict[str, Tensor], flat: set[str], batch_pos: tuple[int, int]) -> None:
    """``[batch·pos, …]`` tensors at the hook points in ``flat`` (ModelAdapter.flattened_hooks: OPT's
    ln2.hook_normalized / hook_scale) back to ``[batch, pos, …]``, in place of ``store``'s entries."""
    b, p = batch_pos
    for key in flat & set(store):
        t = store[key]
        if t.dim() == 2 and t.shape[0] == b * p:
            store[key] = t.reshape(b, p, *t.shape[1:])


def _point(aliases: dict[str, str], name: str) -> _Request:
    """The (forward hook, backward hook) pair, on canonical names, that ``name`` reads."""
    canonical = aliases.get(name, name)
    bwd = canonical
    mid = _RESID_MID.match(name)
    if mid:
        # resid_mid = resid_pre + attn_out feeds both LN2 and the skip connection; the
        # gradient at attn_out is the full one (the alias's backward hook sees LN2 only).
        attn_out = f"blocks.{mid.group(1)}.hook_attn_out"
        bwd = aliases.get(attn_out, attn_out)
    return _Request(name=name, fwd=canonical, bwd=bwd)


def _served_names(hook_dict: Any, aliases: dict[str, str], requests: list[_Request]) -> dict[str, dict[str, str]]:
    """For every hook name of the model, the captured key holding the same activation / gradient."""
    real = [r for r in reversed(requests) if r.derive is None]  # a derived point serves no hook name
    by_fwd = {r.fwd: r.name for r in real}
    by_pair = {(r.fwd, r.bwd): r.name for r in real}
    act_names, grad_names = {}, {}
    for name in hook_dict:
        point = _point(aliases, name)
        if point.fwd in by_fwd:
            act_names[name] = by_fwd[point.fwd]
        if (point.fwd, point.bwd) in by_pair:
            grad_names[name] = by_pair[(point.fwd, point.bwd)]
    return dict(act_names=act_names, grad_names=grad_names)


def _plan(adapter: ModelAdapter, aliases: dict[str, str], names: Names, argument: str) -> tuple[list[_Request], bool]:
    """Resolve requested names to (forward hook, backward hook) pairs on canonical names; the flag
    says whether every name must receive a gradient (explicit names) or may be skipped (filters)."""
    hook_dict = adapter.model.hook_dict
    misfired = {aliases.get(n, n): why for n, why in adapter.misfired_hooks.items()}
    if names is None or (callable(names) and not isinstance(names, str)):
        keep = names or (lambda n: True)
        chosen = [n for n in hook_dict if not _GATED.search(n) and aliases.get(n, n) not in misfired and keep(n)]
        if not chosen:
            raise TLBackwardError(f"the {argument} filter matched no hook point: check it against "
                                  "model.hook_dict, or pass None for every hook point", argument=argument)
        return [_point(aliases, n) for n in chosen], False
    if isinstance(names, str):
        chosen = [names]
    elif isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        chosen = list(names)
    else:
        raise TLBackwardError(
            f"{argument} must be a hook name, a list of hook names, a filter name -> bool, or None (every "
            f"hook point); got {type(names).__name__} {names!r:.60}", argument=argument)
    if not chosen:
        raise TLBackwardError(f"{argument} is empty: list the hook points to capture, or pass None for "
                              "every hook point", argument=argument)
    requests = []
    for name in chosen:
        if name in adapter.derived_hooks:
            source, derive = adapter.derived_hooks[name]
            requests.append(_Request(name=name, fwd=aliases.get(source, source), bwd=name, derive=derive))
            continue
        adapter.resolve_hook(name, argument)
        why = misfired.get(aliases.get(name, name))
        if why:
            raise TLBackwardError(f"{argument}: {name!r} cannot be captured: {why}", argument=argument)
        requests.append(_point(aliases, name))
    return requests, True


def require_hooks(cache: Any, names: Sequence[str], fix: str) -> None:
    """Refuse a ``cache`` (argument ``cache``) that is not a :class:`GradientCache` holding every
    hook in ``names``; ``fix`` is the ``names=...`` expression the message tells the caller to
    capture with (analyses that read a shared cache: RA, factors, flow graphs)."""
    held = getattr(cache, "activations", {})
    missing = [n for n in names if n not in held]
    if missing:
        more = " ..." if len(missing) > 2 else ""
        raise TLBackwardError(f"cache holds no {missing[:2]}{more}: capture with names={fix}", argument="cache")
