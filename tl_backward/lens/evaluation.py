"""Scoring Forward Pass Shift edits CounterFact-style (Katz et al., EMNLP 2024, §5).

:func:`evaluate_edits` scores edits CounterFact-style (teacher-forced argmax accuracy over all
target tokens): efficacy (``target_new`` on the prompt), paraphrase (``target_new`` on the
paraphrases) and neighbourhood (``target_true`` kept on other subjects' prompts), one edit at a
time, restoring the weights after each; with neither ``layer`` nor ``eta`` it scores the unedited
model as a baseline.

Which weights are edited is :func:`~tl_backward.lens.editing.forward_pass_shift`'s rule: a bridge in
compatibility mode is refused (``check_raw``); a ``HookedTransformer`` is edited in the parametrisation
it holds (with ``fold_ln`` / centring that is not the paper's raw-weight edit; see lens/editing.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_backward.core import checks
from tl_backward.core.adapter import get_adapter
from tl_backward.core.batch import Batch
from tl_backward.core.device import input_device
from tl_backward.core.sweep import dataset_size, run_sweep
from tl_backward.errors import TLBackwardError

from .editing import check_eta, check_raw, forward_pass_shift, prompt_tokens, target_ids_of

__all__ = ["EditEvaluation", "continuation_correct", "evaluate_edits"]


@dataclass(frozen=True)
class EditEvaluation:
    """Per-request scores of :func:`evaluate_edits` (fractions in [0, 1]).

    ``efficacy [n]`` (prompt -> target_new), ``paraphrase [n]`` (mean over the paraphrases),
    ``neighborhood [n]`` (mean over neighbour prompts keeping target_true), ``applied [n]``
    (False where the model already predicted target_new, or for the unedited baseline).
    ``layer`` (non-negative) and ``eta`` are None for the baseline.
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
    checkpoint: str | os.PathLike | None = None,
) -> EditEvaluation:
    """Efficacy / paraphrase / neighbourhood accuracy of single FPS edits, or of the unedited model.

    Two modes: ``layer`` and ``eta`` both given edits each request with
    ``forward_pass_shift(model, prompt, target_new, layer=layer, eta=eta)``, scores it and undoes
    it; neither given scores the unedited model (the baseline). Only one of them is an error, so a
    forgotten ``eta`` cannot pass baseline numbers off as edit results.

    ``requests``: CounterFact-style dicts with ``prompt``, ``target_new``, ``target_true``,
    ``paraphrases`` (list of prompts) and ``neighborhood`` (list of prompts; ``neighbourhood`` is
    accepted too). A prediction is correct when, teacher-forced, the argmax at every target
    position is the target token. Every argument and request of a list is checked before the
    first edit; any iterable of requests works too (streamed, each checked when drawn). Under
    ``torchrun`` the requests are sharded over the ranks (every rank returns all scores);
    ``checkpoint=path`` makes the run resumable (core/sweep.py).
    """

    ad = get_adapter(model)
    if layer is None and eta is not None:
        raise TLBackwardError("pass layer= with eta= (the MLP layer to edit)", argument="layer")
    if eta is None and layer is not None:
        raise TLBackwardError(
            "eta is missing: layer= asks for FPS edits, which need a step size; pass eta= (finite, > 0), "
            "or pass neither layer nor eta to score the unedited baseline", argument="eta")
    baseline = eta is None
    if not baseline:
        check_raw(model)
        layer, eta = ad.check_layer(layer), check_eta(eta)
    checks.flag(prepend_bos, "prepend_bos", none_ok=True)
    checks.flag(progress, "progress")
    reqs = _requests(ad, requests, prepend_bos)

    def step(indexed: tuple[int, Any]) -> tuple[dict, int, list]:
        r = _check_request(ad, indexed[1], indexed[0], prepend_bos)  # streamed requests: checked when drawn
        if baseline:
            return {}, 1, [(*_score(model, ad, r, prepend_bos), False)]
        with forward_pass_shift(model, r["prompt"], r["target_new"], layer=layer, eta=eta,
                                prepend_bos=prepend_bos) as edit:
            scores = _score(model, ad, r, prepend_bos)
        return {}, 1, [(*scores, bool(edit.applied))]

    what = "unedited" if baseline else f"FPS edits (layer {layer}, eta {eta:g})"
    fingerprint = f"evaluate_edits {getattr(model.cfg, 'model_name', '?')} {what} prepend_bos={prepend_bos}"
    swept = run_sweep(enumerate(reqs), step, fingerprint=fingerprint, checkpoint=checkpoint, progress=progress,
                      desc=what, total=dataset_size(requests))
    if not swept.records:
        raise TLBackwardError("requests is empty: pass at least one request", argument="requests")
    eff, par, nb, applied = zip(*swept.records)
    return EditEvaluation(efficacy=torch.tensor(eff), paraphrase=torch.tensor(par),
                          neighborhood=torch.tensor(nb), applied=torch.tensor(applied),
                          layer=layer, eta=eta)


def continuation_correct(model: Any, prompts: Sequence[str], targets: Sequence[str | int], *,
                         prepend_bos: bool | None = None) -> Bool[Tensor, " n"]:
    """Whether, teacher-forced, the model's argmax reproduces every token of each target
    (string targets get a leading space if missing). One right-padded forward pass."""
    ad = get_adapter(model)
    for arg, value in (("prompts", prompts), ("targets", targets)):
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
            raise TLBackwardError(f"{arg} must be a non-empty list (one entry per row), got {value!r:.60}",
                                  argument=arg)
    if len(prompts) != len(targets):
        raise TLBackwardError(f"got {len(prompts)} prompts and {len(targets)} targets; pass one target "
                              "per prompt", argument="targets")
    checks.flag(prepend_bos, "prepend_bos", none_ok=True)
    rows, spans = [], []
    for i, (p, t) in enumerate(zip(prompts, targets)):
        if not isinstance(p, str):
            raise TLBackwardError(f"prompts[{i}] must be a string, got {type(p).__name__}", argument="prompts")
        ids = prompt_tokens(ad, p, prepend_bos, "prompts", f"prompts[{i}]").rows()[0]
        tgt = target_ids_of(ad, t, "targets", f"targets[{i}]")
        rows.append(torch.cat([ids, tgt[:-1]]))
        spans.append((len(ids) - 1, tgt))
    batch = Batch.from_rows(rows, ad.pad_id)
    if batch.tokens.shape[1] > ad.n_ctx:
        raise TLBackwardError(f"a prompt plus its target is {batch.tokens.shape[1]} tokens, more than the "
                              f"model's context ({ad.n_ctx}); shorten it", argument="prompts")
    device = input_device(model)
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


def _requests(ad: Any, requests: Any, prepend_bos: bool | None) -> Iterable[Any]:
    """The requests to draw: a list is checked whole before the first edit; any other iterable (a
    generator, a ``datasets.Dataset``) is checked request by request as it is drawn."""
    if isinstance(requests, (dict, str)) or not isinstance(requests, Iterable):
        raise TLBackwardError("requests must be a list of CounterFact-style dicts (or another iterable of them), got "
                              f"{type(requests).__name__}", argument="requests")
    if isinstance(requests, Sequence):
        if not requests:
            raise TLBackwardError("requests is empty: pass at least one request", argument="requests")
        for i, r in enumerate(requests):
            _check_request(ad, r, i, prepend_bos)
    return requests


def _check_request(ad: Any, r: Any, i: int, prepend_bos: bool | None) -> dict:
    """A checked copy of ``requests[i]`` (``neighbourhood`` -> ``neighborhood``); every prompt is
    tokenised and every target looked up here, so a bad request fails before the first edit."""
    if not isinstance(r, dict):
        raise TLBackwardError(f"requests[{i}] must be a dict, got {type(r).__name__}", argument="requests")
    r = dict(r)
    if "neighbourhood" in r:
        if "neighborhood" in r and r["neighborhood"] != r["neighbourhood"]:
            raise TLBackwardError(f"requests[{i}] has both 'neighborhood' and 'neighbourhood', and they "
                                  "differ; keep one", argument="requests")
        r["neighborhood"] = r.pop("neighbourhood")
    missing = [k for k in REQUIRED if k not in r]
    if missing:
        raise TLBackwardError(f"requests[{i}] lacks {missing}; each request needs {list(REQUIRED)}",
                              argument="requests")
    for k in ("paraphrases", "neighborhood"):
        if isinstance(r[k], str) or not isinstance(r[k], (list, tuple)):
            raise TLBackwardError(f"requests[{i}][{k!r}] must be a list of prompts", argument="requests")
    prompts = [(f"requests[{i}]['prompt']", r["prompt"])] + [
        (f"requests[{i}][{k!r}][{j}]", p) for k in ("paraphrases", "neighborhood") for j, p in enumerate(r[k])]
    for what, p in prompts:
        if not isinstance(p, str):
            raise TLBackwardError(f"{what} must be a string, got {type(p).__name__}", argument="requests")
        prompt_tokens(ad, p, prepend_bos, "requests", what)
    for k in ("target_new", "target_true"):
        target_ids_of(ad, r[k], "requests", f"requests[{i}][{k!r}]")
    return r
