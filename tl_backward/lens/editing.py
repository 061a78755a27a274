"""Forward Pass Shift (FPS): gradient-free knowledge editing from one forward pass.

Katz, Belinkov, Geva, Wolf, *Backward Lens*, EMNLP 2024, §5. For a prompt s and target t (its
first token; a leading space is added to string targets, as BPE vocabularies need), with ``x_n``
= the input of ``W_out`` at layer ℓ and the last position (``mlp.hook_post``) and
``e_t = W_U[:, t]`` the raw unembedding column::

    W_out[ℓ] += η · x_n ⊗ e_t          (TL layout [d_mlp, d_model]; bias untouched)

On the same prompt the MLP output at the last position then gains exactly ``η‖x_n‖² e_t``, which
raises logit t by ≈ ``η‖x_n‖²‖e_t‖²`` before the later layers. The update is written into the
parameter the adapter names (``ModelAdapter.mlp_out_weight``), in that parameter's own layout: on a
bridge the HF module's weight, its layout decided by the module's class and never by shape (with
``d_mlp == d_model`` both orientations fit): ``torch.nn.Linear`` stores ``[out, in] = [d_model,
d_mlp]`` and gets ``η e_t ⊗ x_n``; transformers' ``Conv1D`` (GPT-2) stores ``[in, out] = [d_mlp,
d_model]`` and gets ``η x_n ⊗ e_t``; other modules are refused. On a ``HookedTransformer`` it is
``blocks[ℓ].mlp.W_out [d_mlp, d_model]`` itself (``post @ W_out``), which gets ``η x_n ⊗ e_t``.

Which weights: a bridge in compatibility mode is refused (W_out / W_U folded there). A
``HookedTransformer`` records no such flag: one loaded with ``fold_ln`` / ``center_writing_weights`` /
``center_unembed`` (TransformerLens's ``from_pretrained`` default) is edited in the parametrisation it
holds: ``e_t`` is its processed column (``ln_final``'s gain folded in, centred over the vocabulary) and
``W_out`` its centred matrix. The identities above hold exactly for that model (the edit is
``W_out += η x_n ⊗ e_t`` with its own tensors, the MLP output gains ``η‖x_n‖² e_t``), but it is not
the paper's edit of the raw weights, and an η tuned on one does not carry over to the other; for the
paper's edit load it raw (``tl_backward.load_model(..., backend="hooked")`` or
``from_pretrained_no_processing``).

Undo semantics (several edits may be active, on the same or on different layers, and undone in
any order): the first edit of a weight saves a pristine copy of it. While edits are active the
weight is exactly ``pristine + u_1 + u_2 + …`` over the edits not yet undone, added one after the
other in the order they were applied; undoing any of them rebuilds the weight from the pristine
copy with the others re-added in that order, and once the last one is undone the pristine copy
is written back, so the weights are the originals bit for bit. Each edit keeps the ``x_n`` and
the applied/skipped decision measured when it was applied (on the model as it was then). Changes
made to an edited weight by other means while an edit is active are overwritten by the next undo.

Mixture-of-experts layers (tl_backward/core/moe.py): the last prompt token is routed to experts e
with weights w_e, and h^e is the input of expert e's down projection there. Each routed expert gets
``W_down^e += η·h^e ⊗ e_t`` (written into transformers' batched ``down_proj`` in its own layout), so
the MoE output at that position gains exactly ``η Σ_e w_e‖h^e‖² e_t``: the router reads the block
input, which the edit does not change. Other experts are untouched.

Scoring edits (:func:`~tl_backward.lens.evaluation.evaluate_edits`) lives in ``lens/evaluation.py``.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_backward.core import checks
from tl_backward.core.adapter import get_adapter
from tl_backward.core.device import input_device
from tl_backward.errors import TLBackwardError


class _WeightLedger:
    """The pristine copy of one edited weight and the updates active on it, in application order.

    Invariant: ``param == pristine (+ u_1) (+ u_2) …`` over ``active``, each ``+`` one in-place
    add in the parameter's dtype. Removing any update and re-adding the others onto the pristine
    copy therefore reproduces, bit for bit, the weight the remaining edits alone would have made.
    """

    def __init__(self, param: Tensor):
        self.param = param  # strong: its id stays unique while the ledger is alive
        self.pristine = param.detach().clone()
        self.active: dict[int, Tensor] = {}  # slot -> update in the parameter's layout and dtype
        self._slots = itertools.count()

    def push(self, update: Tensor) -> int:
        slot = next(self._slots)
        self.active[slot] = update
        with torch.no_grad():
            self.param.add_(update)
        return slot

    def remove(self, slot: int) -> None:
        del self.active[slot]
        with torch.no_grad():
            self.param.copy_(self.pristine)
            for update in self.active.values():
                self.param.add_(update)
        if not self.active and _LEDGERS.get(id(self.param)) is self:
            del _LEDGERS[id(self.param)]


# One ledger per edited parameter, alive as long as an Edit on it is (the Edits hold it).
_LEDGERS: "weakref.WeakValueDictionary[int, _WeightLedger]" = weakref.WeakValueDictionary()


def _ledger(param: Tensor) -> _WeightLedger:
    ledger = _LEDGERS.get(id(param))
    if ledger is None:
        ledger = _LEDGERS[id(param)] = _WeightLedger(param)
    return ledger


@dataclass(eq=False)
class Edit:
    """A Forward Pass Shift edit on a model; a context manager (``with forward_pass_shift(...):``).

    ``applied`` is False when the model already predicted the target (the edit is skipped, as in
    the reference). ``x [d_mlp]`` and ``e_t [d_model]`` are the two factors of the update
    (on a mixture-of-experts layer ``x [top_k, d_expert]`` holds the routed ``experts``' down
    projection inputs, ``weights [top_k]`` their routing weights, one update per expert)
    ``delta = η x ⊗ e_t`` (TL layout). ``undo()`` removes this edit and keeps the others (see the
    module docstring: exact in any order, originals bit for bit once all are undone); it is
    idempotent. An Edit is entered at most once and never after ``undo()``: its exit undoes it,
    so a second with-block would silently run on the unedited model.
    """

    layer: int
    eta: float
    target_id: int
    x: Float[Tensor, "*top_k d_mlp"]
    e_t: Float[Tensor, " d_model"]
    applied: bool
    model: Any = field(repr=False)
    experts: tuple[int, ...] | None = None
    weights: Float[Tensor, " top_k"] | None = field(default=None, repr=False)
    _ledger: _WeightLedger | None = field(default=None, repr=False)
    _slot: int | None = field(default=None, repr=False)
    _undone: bool = field(default=False, repr=False)
    _entered: bool = field(default=False, repr=False)

    def __repr__(self) -> str:
        state = ("active" if self.active else "undone") if self.applied else "skipped: already predicted"
        moe = f", experts {list(self.experts)}" if self.experts is not None else ""
        return f"Edit(FPS layer {self.layer}{moe}, eta {self.eta:g}, target id {self.target_id}, {state})"

    @property
    def active(self) -> bool:
        """True while the edit is in the model's weights."""
        return self._ledger is not None

    @property
    def delta(self) -> Float[Tensor, "*top_k d_mlp d_model"]:
        """The update added to ``W_out[layer]`` (TL layout; per routed expert on MoE layers);
        zeros if the edit was skipped."""
        d = self.eta * torch.einsum("...i,o->...io", self.x, self.e_t)
        return d if self.applied else torch.zeros_like(d)

    @property
    def mlp_out_change(self) -> Float[Tensor, " d_model"]:
        """Exact change of ``mlp_out[layer]`` at the edited prompt's last position: η‖x‖² e_t, or
        on MoE layers ``η Σ_e w_e‖h^e‖² e_t`` over the routed experts (the routing is unchanged)."""
        if not self.applied:
            return torch.zeros_like(self.e_t)
        sq = self.x.pow(2).sum(-1)
        return self.eta * (sq if self.weights is None else (self.weights * sq).sum()) * self.e_t

    def undo(self) -> None:
        """Take this edit out of the weights, keeping the other active edits. Safe to call again."""
        if self._ledger is not None:
            self._ledger.remove(self._slot)
            self._ledger = None
        self._undone = True

    def __enter__(self) -> "Edit":
        if self._undone:
            raise TLBackwardError(
                "this edit was already undone, so the with-block would run on the unedited model; "
                "make a new one with forward_pass_shift(...)", argument="edit")
        if self._entered:
            raise TLBackwardError(
                "this edit is already inside a with-block, whose exit undoes it; enter each edit once",
                argument="edit")
        self._entered = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self.undo()


def forward_pass_shift(
    model: Any,
    prompt: str,
    target: str | int,
    *,
    layer: int,
    eta: float,
    prepend_bos: bool | None = None,
) -> Edit:
    """Apply one FPS edit ``W_out[layer] += eta · x_n ⊗ W_U[:, t]`` (one forward pass, no backward).

    Args:
        model: a reconstructing ``TransformerBridge`` in raw mode (compatibility mode is refused)
            whose MLP out-projection is a ``torch.nn.Linear`` or a transformers ``Conv1D``, or a
            ``HookedTransformer`` with dense MLPs (processed weights: see the module docstring).
        prompt: the prompt whose completion should become ``target``.
        target: a string (a leading space is added if missing; its first token is used) or a
            token id.
        layer: the MLP layer to edit, an int (negative counts from the end).
        eta: the step size, finite and > 0; it scales with ‖x_n‖²‖e_t‖², so tune it per model/layer.
        prepend_bos: None uses the model's default.

    Returns:
        An :class:`Edit`; use it as a context manager or call ``undo()``. Raises
        :class:`TLBackwardError` naming the argument for any bad value, before touching the model.
    """
    ad = get_adapter(model)
    check_raw(model)
    if not isinstance(prompt, str):
        raise TLBackwardError(f"prompt must be a string, got {type(prompt).__name__}", argument="prompt")
    layer = ad.check_layer(layer)  # negative counts from the end
    eta = check_eta(eta)
    checks.flag(prepend_bos, "prepend_bos", none_ok=True)
    t = target_id_of(ad, target, "target")
    tokens = prompt_tokens(ad, prompt, prepend_bos, "prompt").tokens
    if ad.moe(layer) is not None:
        return _moe_shift(model, ad, ad.moe(layer), eta, t, tokens)
    weight, out_in = ad.mlp_out_weight(layer)  # the parameter itself and its layout (core adapters)
    name = ad.linear(layer, "mlp_out").hook_in.name  # W_out's input: blocks.L.mlp.hook_post
    device = input_device(model)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens.to(device), names_filter=[name], return_type="logits")
    x = cache[name][0, -1].detach().float().cpu().clone()
    e_t = ad.W_U[:, t].cpu().clone()
    edit = Edit(layer=layer, eta=eta, target_id=t, x=x, e_t=e_t, applied=False, model=model)
    if int(logits[0, -1].argmax()) == t:
        return edit
    return _push(edit, weight, eta * (torch.outer(e_t, x) if out_in else torch.outer(x, e_t)))


# ------------------------------------------- argument readers (shared with lens/evaluation.py)
def check_raw(model: Any) -> None:
    """Refuse a bridge in compatibility mode (folded W_out / W_U). A HookedTransformer records no such
    flag, so it passes whatever it holds (module docstring: FPS in the processed parametrisation)."""
    if getattr(model, "compatibility_mode", False):
        raise TLBackwardError(
            "forward_pass_shift needs raw weights: this model is in compatibility mode (folded layer "
            "norms, centred W_U), where W_out and the unembedding column mean something else; boot it "
            "without enable_compatibility_mode()", argument="model")


def _moe_shift(model: Any, ad: Any, moe: Any, eta: float, t: int, tokens: Tensor) -> Edit:
    """FPS on a mixture-of-experts layer: every expert e the last prompt token is routed to gets
    ``W_down^e += η h^e ⊗ e_t`` (h^e its down projection's input there), so the MoE output at that
    position gains ``η Σ_e w_e‖h^e‖² e_t`` (the router reads the unchanged block input)."""
    name = moe.hooks[0]  # mlp.hook_in: the block input, read by the router and the experts
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens.to(input_device(model)), names_filter=[name], return_type="logits")
    experts, weights, h = moe.expert_inputs(cache[name][0, -1].detach())
    e_t = ad.W_U[:, t].cpu().clone()
    edit = Edit(layer=moe.layer, eta=eta, target_id=t, x=h.cpu(), e_t=e_t, applied=False, model=model,
                experts=tuple(experts), weights=weights.cpu())
    if int(logits[0, -1].argmax()) == t:
        return edit
    return _push(edit, moe.experts.down_proj, moe.down_update(experts, h, e_t, eta))


def _push(edit: Edit, param: Tensor, update: Tensor) -> Edit:
    """Add ``update`` to ``param`` through its ledger; refuse (and take it back) if non-finite."""
    ledger = _ledger(param)
    slot = ledger.push(update.to(device=param.device, dtype=param.dtype))
    if not bool(torch.isfinite(param).all()):
        ledger.remove(slot)
        raise TLBackwardError(
            f"eta={edit.eta:g} makes W_out[{edit.layer}] non-finite in {param.dtype} (the update is eta·x⊗e_t "
            f"with ‖x‖²‖e_t‖² = {float(edit.x.pow(2).sum() * edit.e_t.pow(2).sum()):.3g}); pass a smaller eta",
            argument="eta")
    edit.applied, edit._ledger, edit._slot = True, ledger, slot
    return edit


def check_eta(eta: Any) -> float:
    return checks.finite_float(eta, "eta", positive=True, hint="the step size, finite and > 0")


def prompt_tokens(ad: Any, prompt: str, prepend_bos: bool | None, argument: str, what: str | None = None) -> Any:
    """``ad.tokenize(prompt)``, its complaints (empty, too long) naming ``argument`` and ``what``."""
    try:
        return ad.tokenize(prompt, prepend_bos, argument)
    except TLBackwardError as err:
        if what is None or what == argument:
            raise
        raise TLBackwardError(f"{what} {prompt!r:.60}: {err}", argument=argument) from err


def target_ids_of(ad: Any, target: Any, argument: str, what: str | None = None) -> Tensor:
    what = what or argument
    if target is None:
        raise TLBackwardError(f"{what} is None: pass the new target word or its token id", argument=argument)
    try:
        return ad.target_tokens(_with_space(target), argument)
    except TLBackwardError as err:
        if what == argument:
            raise
        raise TLBackwardError(f"{what}: {err}", argument=argument) from err


def target_id_of(ad: Any, target: Any, argument: str, what: str | None = None) -> int:
    return int(target_ids_of(ad, target, argument, what)[0])


def _with_space(target: Any) -> Any:
    return " " + target if isinstance(target, str) and not target.startswith(" ") else target


__all__ = ["Edit", "EditEvaluation", "forward_pass_shift", "evaluate_edits", "continuation_correct"]
