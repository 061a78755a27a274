"""Forward Pass Shift (FPS): gradient-free knowledge editing from one forward pass (spec §5).

For a prompt s and target t (its first token; a leading space is added to string targets, as
BPE vocabularies need), with ``x_n`` = the input of ``W_out`` at layer ℓ and the last position
(``mlp.hook_post``) and ``e_t = W_U[:, t]`` the raw unembedding column::

    W_out[ℓ] += η · x_n ⊗ e_t          (TL layout [d_mlp, d_model]; bias untouched)

On the same prompt the MLP output at the last position then gains exactly ``η‖x_n‖² e_t``, which
raises logit t by ≈ ``η‖x_n‖²‖e_t‖²`` before the later layers. The edit is written to the HF
parameter the bridge uses (transposed for ``nn.Linear``) and undone by copying the saved original
back, so ``undo()`` restores the weights bit for bit. Raw weights only: refused in compatibility
mode, where W_out / W_U are folded and η would mean something else.

:func:`evaluate_edits` scores edits CounterFact-style (teacher-forced argmax accuracy over all
target tokens): efficacy (``target_new`` on the prompt), paraphrase (``target_new`` on the
paraphrases) and neighbourhood (``target_true`` kept on other subjects' prompts), one edit at a
time, restoring the weights after each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_backward.core.adapter import Batch, get_adapter

from .factors import _finite


@dataclass(eq=False)
class Edit:
    """A Forward Pass Shift edit on a model; a context manager (``with forward_pass_shift(...):``).

    ``applied`` is False when the model already predicted the target (the edit is skipped, as in
    the reference). ``x [d_mlp]`` and ``e_t [d_model]`` are the two factors of the update
    ``delta = η x ⊗ e_t`` (TL layout); ``undo()`` restores the saved weights bit for bit and is
    idempotent.
    """

    layer: int
    eta: float
    target_id: int
    x: Float[Tensor, " d_mlp"]
    e_t: Float[Tensor, " d_model"]
    applied: bool
    model: Any = field(repr=False)
    _param: Any = field(default=None, repr=False)
    _original: Tensor | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        state = ("active" if self.active else "undone") if self.applied else "skipped: already predicted"
        return f"Edit(FPS layer {self.layer}, eta {self.eta:g}, target id {self.target_id}, {state})"

    @property
    def active(self) -> bool:
        """True while the edit is in the model's weights."""
        return self._original is not None

    @property
    def delta(self) -> Float[Tensor, "d_mlp d_model"]:
        """The update added to ``W_out[layer]`` (TL layout); zeros if the edit was skipped."""
        if not self.applied:
            return torch.zeros(self.x.shape[0], self.e_t.shape[0])
        return self.eta * torch.outer(self.x, self.e_t)

    @property
    def mlp_out_change(self) -> Float[Tensor, " d_model"]:
        """Exact change of ``mlp_out[layer]`` at the edited prompt's last position: η‖x‖² e_t."""
        return self.eta * self.x.pow(2).sum() * self.e_t if self.applied else torch.zeros_like(self.e_t)

    def undo(self) -> None:
        """Restore the original weights (bit for bit). Safe to call more than once."""
        if self._original is not None:
            with torch.no_grad():
                self._param.copy_(self._original)
            object.__setattr__(self, "_original", None)

    def __enter__(self) -> "Edit":
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
        model: a reconstructing ``TransformerBridge`` in raw mode (compatibility mode is refused).
        prompt: the prompt whose completion should become ``target``.
        target: a string (a leading space is added if missing; its first token is used) or a
            token id.
        layer: the MLP layer to edit (negative counts from the end).
        eta: the step size, finite and > 0; it scales with ‖x_n‖²‖e_t‖², so tune it per model/layer.
        prepend_bos: None uses the model's default.

    Returns:
        An :class:`Edit`; use it as a context manager or call ``undo()``.
    """
    ad = get_adapter(model)
    if getattr(model, "compatibility_mode", False):
        raise ValueError(
            "forward_pass_shift needs raw weights: this model is in compatibility mode (folded layer "
            "norms, centred W_U), where W_out and the unembedding column mean something else; boot it "
            "without enable_compatibility_mode()"
        )
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    if isinstance(layer, int) and not isinstance(layer, bool) and layer < 0:
        layer += ad.n_layers
    layer = ad.check_layer(layer)
    eta = _finite(eta, "eta")
    if eta <= 0:
        raise ValueError(f"eta must be > 0 (the edit adds eta · x ⊗ e_t), got {eta}")
    t = _target_id(ad, target)
    tokens = ad.tokenize(prompt, prepend_bos).tokens
    lin = ad.linear(layer, "mlp_out")
    name = lin.hook_in.name  # = blocks.L.mlp.hook_post
    device = next(model.parameters()).device
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens.to(device), names_filter=[name], return_type="logits")
    x = cache[name][0, -1].detach().float().cpu().clone()
    e_t = ad.W_U[:, t].cpu().clone()
    if int(logits[0, -1].argmax()) == t:
        return Edit(layer=layer, eta=eta, target_id=t, x=x, e_t=e_t, applied=False, model=model)
    param = lin.original_component.weight
    original = param.detach().clone()
    update = eta * torch.outer(x, e_t)  # TL layout [d_mlp, d_model]
    if tuple(param.shape) != tuple(update.shape):  # nn.Linear stores [out, in]
        update = update.T
    if tuple(param.shape) != tuple(update.shape):  # pragma: no cover - guarded by the adapter
        raise RuntimeError(f"unexpected W_out parameter shape {tuple(param.shape)}")
    with torch.no_grad():
        param.add_(update.to(device=param.device, dtype=param.dtype))
    return Edit(layer=layer, eta=eta, target_id=t, x=x, e_t=e_t, applied=True, model=model,
                _param=param, _original=original)


@dataclass(frozen=True)
class EditEvaluation:
    """Per-request scores of :func:`evaluate_edits` (fractions in [0, 1]).

    ``efficacy [n]`` (prompt -> target_new), ``paraphrase [n]`` (mean over the paraphrases),
    ``neighborhood [n]`` (mean over neighbour prompts keeping target_true), ``applied [n]``
    (False where the model already predicted target_new, or for the unedited baseline).
    """

    efficacy: Float[Tensor, " n"]
    paraphrase: Float[Tensor, " n"]
    neighborhood: Float[Tensor, " n"]
    applied: Bool[Tensor, " n"]
    layer: int | None
    eta: float | None

    def __repr__(self) -> str:
        return f"EditEvaluation({self})"

    def summary(self) -> dict[str, float]:
        """Means over requests (fractions), plus the number of requests and of applied edits."""
        return {
            "efficacy": float(self.efficacy.mean()), "paraphrase": float(self.paraphrase.nanmean()),
            "neighborhood": float(self.neighborhood.nanmean()), "n": len(self.efficacy),
            "applied": int(self.applied.sum()),
        }

    def __str__(self) -> str:
        s = self.summary()
        what = "unedited" if self.eta is None else f"FPS layer {self.layer}, eta {self.eta:g}"
        return (f"{what}: efficacy {100 * s['efficacy']:.1f}%  paraphrase {100 * s['paraphrase']:.1f}%  "
                f"neighbourhood {100 * s['neighborhood']:.1f}%  (n={s['n']}, applied {s['applied']})")


REQUIRED = ("prompt", "target_new", "target_true", "paraphrases", "neighborhood")


def evaluate_edits(
    model: Any,
    requests: Sequence[dict],
    *,
    layer: int | None = None,
    eta: float | None = None,
    prepend_bos: bool | None = None,
    progress: bool = True,
) -> EditEvaluation:
    """Efficacy / paraphrase / neighbourhood accuracy of single FPS edits (or, with ``eta=None``,
    of the unedited model as a baseline). Each request is edited, scored and undone in turn.

    ``requests``: CounterFact-style dicts with ``prompt``, ``target_new``, ``target_true``,
    ``paraphrases`` (list of prompts) and ``neighborhood`` (list of prompts; ``neighbourhood`` is
    accepted too). A prediction is correct when, teacher-forced, the argmax at every target
    position is the target token.
    """
    from tqdm.auto import tqdm

    ad = get_adapter(model)
    reqs = [_check_request(r, i) for i, r in enumerate(_as_list(requests))]
    if eta is not None and layer is None:
        raise ValueError("pass layer= with eta= (the MLP layer to edit)")
    eff, par, nb, applied = [], [], [], []
    desc = "unedited" if eta is None else f"FPS edits (layer {layer}, eta {eta:g})"
    for r in tqdm(reqs, desc=desc, disable=not progress):
        if eta is None:
            edit = None
            scores = _score(model, ad, r, prepend_bos)
        else:
            with forward_pass_shift(model, r["prompt"], r["target_new"], layer=layer, eta=eta,
                                    prepend_bos=prepend_bos) as edit:
                scores = _score(model, ad, r, prepend_bos)
        eff.append(scores[0])
        par.append(scores[1])
        nb.append(scores[2])
        applied.append(bool(edit is not None and edit.applied))
    return EditEvaluation(efficacy=torch.tensor(eff), paraphrase=torch.tensor(par),
                          neighborhood=torch.tensor(nb), applied=torch.tensor(applied),
                          layer=None if eta is None else layer, eta=eta)


def continuation_correct(model: Any, prompts: Sequence[str], targets: Sequence[str | int], *,
                         prepend_bos: bool | None = None) -> Bool[Tensor, " n"]:
    """Whether, teacher-forced, the model's argmax reproduces every token of each target
    (string targets get a leading space if missing). One right-padded forward pass."""
    ad = get_adapter(model)
    if len(prompts) != len(targets):
        raise ValueError(f"got {len(prompts)} prompts and {len(targets)} targets")
    rows, spans = [], []
    for p, t in zip(prompts, targets):
        ids = ad.tokenize(p, prepend_bos).rows()[0]
        tgt = ad.target_tokens(_with_space(t))
        rows.append(torch.cat([ids, tgt[:-1]]))
        spans.append((len(ids) - 1, tgt))
    batch = ad._check_length(Batch.from_rows(rows, ad.pad_id))
    device = next(model.parameters()).device
    with torch.no_grad():
        pred = model(batch.tokens.to(device), return_type="logits").argmax(-1).cpu()
    return torch.tensor([bool((pred[i, s:s + len(t)] == t).all()) for i, (s, t) in enumerate(spans)])


def _score(model: Any, ad: Any, r: dict, prepend_bos: bool | None) -> tuple[float, float, float]:
    prompts = [r["prompt"], *r["paraphrases"], *r["neighborhood"]]
    targets = [r["target_new"]] * (1 + len(r["paraphrases"])) + [r["target_true"]] * len(r["neighborhood"])
    ok = continuation_correct(model, prompts, targets, prepend_bos=prepend_bos).float()
    n_par = len(r["paraphrases"])
    par = ok[1:1 + n_par].mean() if n_par else torch.tensor(float("nan"))
    nb = ok[1 + n_par:].mean() if r["neighborhood"] else torch.tensor(float("nan"))
    return float(ok[0]), float(par), float(nb)


def _as_list(requests: Any) -> list:
    if isinstance(requests, dict) or isinstance(requests, str) or not isinstance(requests, Sequence):
        raise TypeError("requests must be a list of CounterFact-style dicts")
    if not requests:
        raise ValueError("requests is empty")
    return list(requests)


def _check_request(r: Any, i: int) -> dict:
    if not isinstance(r, dict):
        raise TypeError(f"requests[{i}] must be a dict, got {type(r).__name__}")
    r = dict(r)
    if "neighborhood" not in r and "neighbourhood" in r:
        r["neighborhood"] = r["neighbourhood"]
    missing = [k for k in REQUIRED if k not in r]
    if missing:
        raise ValueError(f"requests[{i}] lacks {missing}; each request needs {list(REQUIRED)}")
    for k in ("paraphrases", "neighborhood"):
        if isinstance(r[k], str) or not isinstance(r[k], (list, tuple)):
            raise TypeError(f"requests[{i}][{k!r}] must be a list of prompts")
    return r


def _with_space(target: Any) -> Any:
    return " " + target if isinstance(target, str) and not target.startswith(" ") else target


def _target_id(ad: Any, target: Any) -> int:
    if target is None:
        raise ValueError("target is None: pass the new target word or its token id")
    return int(ad.target_tokens(_with_space(target))[0])


__all__ = ["Edit", "EditEvaluation", "forward_pass_shift", "evaluate_edits", "continuation_correct"]
