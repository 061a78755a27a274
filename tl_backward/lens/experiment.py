"""Forward Pass Shift editing on the embedded model's CounterFact-style requests (Katz et al.,
EMNLP 2024, §5; docs/backward_lens.md).

Protocol (the paper's, scaled down): requests come from the synthetic world
(:meth:`tl_backward.zoo.world.World.edit_requests`: a prompt, a true and a new one-word target,
paraphrases -- the held-out template first -- and neighbour prompts whose true answer is the same
``target_true``). The first ``n_tune`` requests tune the layer and η on a grid; the others are
held out and scored once with the chosen setting and once unedited. One edit at a time, weights
restored after each. Metrics (teacher-forced argmax accuracy): efficacy, paraphrase,
neighbourhood; the tuning criterion is MEMIT's *score*, the harmonic mean of the three.

``run()`` prints the tables and returns an :class:`EditingRun` (the grid of :class:`GridPoint`,
the chosen point, the held-out :class:`EditScores` edited and unedited), so notebooks and the CLI
can reuse it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ..core.adapter import get_adapter
from ..core.loading import load_model
from ..core.results import Record
from ..errors import TLBackwardError
from ..zoo import model_card
from ..zoo.world import World
from .evaluation import EditEvaluation, evaluate_edits

# η scales with ‖x_n‖²‖e_t‖², and ‖x_n‖² differs by ~35x across facts-gpt2's layers: a wide grid.
DEFAULT_ETAS = (0.05, 0.1, 0.14, 0.2, 0.28, 0.4, 0.8, 1.6, 3.2, 6.4)


def harmonic_score(summary: Mapping[str, float]) -> float:
    """Harmonic mean of efficacy, paraphrase and neighbourhood (0 if any is 0)."""
    vals = [summary["efficacy"], summary["paraphrase"], summary["neighborhood"]]
    return 0.0 if min(vals) <= 0 else len(vals) / sum(1 / v for v in vals)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


@dataclass(frozen=True)
class GridPoint(Record):
    """One (layer, η) of the tuning grid: efficacy, paraphrase and neighbourhood accuracy over the
    tuning requests (fractions in [0, 1]) and ``score``, their :func:`harmonic_score`."""

    layer: int
    eta: float
    efficacy: float
    paraphrase: float
    neighborhood: float
    score: float

    def __repr__(self) -> str:
        return (f"GridPoint(layer {self.layer}, η {self.eta:g}: efficacy {_pct(self.efficacy)}, paraphrase "
                f"{_pct(self.paraphrase)}, neighbourhood {_pct(self.neighborhood)}; score {self.score:.3f})")


@dataclass(frozen=True)
class EditScores(Record):
    """An :class:`~tl_backward.lens.evaluation.EditEvaluation` summarised: mean efficacy, paraphrase and
    neighbourhood accuracy (fractions), their :func:`harmonic_score`, ``n`` requests, ``applied``
    edits (0 for the unedited baseline)."""

    efficacy: float
    paraphrase: float
    neighborhood: float
    score: float
    n: int
    applied: int

    @classmethod
    def of(cls, ev: EditEvaluation) -> EditScores:
        s = ev.summary()
        return cls(efficacy=s["efficacy"], paraphrase=s["paraphrase"], neighborhood=s["neighborhood"],
                   score=harmonic_score(s), n=s["n"], applied=s["applied"])

    def __repr__(self) -> str:
        return (f"EditScores(efficacy {_pct(self.efficacy)}, paraphrase {_pct(self.paraphrase)}, neighbourhood "
                f"{_pct(self.neighborhood)}; score {self.score:.3f}; n={self.n}, applied {self.applied})")


@dataclass(frozen=True)
class EditingRun(Record):
    """Result of :func:`run`: the tuning ``grid`` (one :class:`GridPoint` per layer x η, on
    ``n_tune`` requests), the ``chosen`` point (best score; ties: higher efficacy, then smaller η),
    and :class:`EditScores` on the ``n_eval`` held-out requests, ``edited`` with the chosen setting
    and ``baseline`` unedited. ``seconds``: the run's wall time (not compared by ``==``)."""

    grid: tuple[GridPoint, ...]
    chosen: GridPoint
    edited: EditScores
    baseline: EditScores
    n_tune: int
    n_eval: int
    seconds: float = field(compare=False)

    def __repr__(self) -> str:
        c = self.chosen
        return (f"EditingRun(layer {c.layer}, η {c.eta:g} of {len(self.grid)} grid points on {self.n_tune} requests; "
                f"held-out {self.n_eval}: efficacy {_pct(self.edited.efficacy)} (unedited "
                f"{_pct(self.baseline.efficacy)}), score {self.edited.score:.3f})")

    def table(self) -> str:
        """The tuning grid and the held-out comparison as plain-text tables (percent)."""
        lines = [f"FPS tuning grid on {self.n_tune} requests (score = harmonic mean):",
                 f"{'layer':>5} {'eta':>6} {'efficacy':>9} {'paraphr.':>9} {'neighb.':>9} {'score':>7}"]
        for g in self.grid:
            lines.append(f"{g.layer:>5} {g.eta:>6.3g} {100 * g.efficacy:>8.1f}% {100 * g.paraphrase:>8.1f}% "
                         f"{100 * g.neighborhood:>8.1f}% {g.score:>7.3f}")
        c = self.chosen
        lines += ["", f"Held-out requests: {self.n_eval}; chosen layer {c.layer}, eta {c.eta:g}",
                  f"{'':>10} {'efficacy':>9} {'paraphr.':>9} {'neighb.':>9} {'score':>7} {'applied':>8}"]
        for label, s in (("unedited", self.baseline), ("FPS", self.edited)):
            lines.append(f"{label:>10} {100 * s.efficacy:>8.1f}% {100 * s.paraphrase:>8.1f}% "
                         f"{100 * s.neighborhood:>8.1f}% {s.score:>7.3f} {s.applied:>8}")
        return "\n".join(lines)

    def to_frame(self):
        """The tuning grid as a pandas DataFrame (pandas is optional: imported here only)."""
        import pandas as pd

        return pd.DataFrame([g.to_dict() for g in self.grid], columns=[*GridPoint.__dataclass_fields__])


def run(
    model: Any = None,
    requests: Sequence[dict] | None = None,
    *,
    n_requests: int = 100,
    n_tune: int = 12,
    layers: Sequence[int] | None = None,
    etas: Sequence[float] = DEFAULT_ETAS,
    seed: int = 0,
    prepend_bos: bool | None = None,
    progress: bool = True,
    threads: int | None = None,
) -> EditingRun:
    """Tune (layer, η) on ``n_tune`` requests, then score the held-out rest, edited and unedited.

    Args:
        model: a bridge; default the embedded ``facts-gpt2`` (raw weights, BOS prepended).
        requests: CounterFact-style dicts; default ``World(world_seed).edit_requests(n_requests, seed)``.
        layers / etas: the tuning grid (default every layer x :data:`DEFAULT_ETAS`).
        threads: torch threads during the run (restored afterwards); 1 is much faster for the
            tiny embedded model on a busy machine (no thread barriers per op).

    Returns:
        an :class:`EditingRun`: the grid of :class:`GridPoint`, the chosen one, and the held-out
        :class:`EditScores` edited and unedited, with fractions in [0, 1]. Prints its table.
    """
    if threads is None:
        return _run(model, requests, n_requests, n_tune, layers, etas, seed, prepend_bos, progress)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(model, requests, n_requests, n_tune, layers, etas, seed, prepend_bos, progress)
    finally:
        torch.set_num_threads(before)


def _run(model, requests, n_requests, n_tune, layers, etas, seed, prepend_bos, progress) -> EditingRun:
    start = time.perf_counter()
    if model is None:
        model = load_model("facts-gpt2")
    ad = get_adapter(model)
    if requests is None:
        try:
            world_seed = int(model_card("facts-gpt2")["train_config"]["world_seed"])
        except (KeyError, ValueError, FileNotFoundError):
            world_seed = 0
        requests = World(world_seed).edit_requests(n_requests, seed=seed)
    requests = list(requests)
    if not 0 < n_tune < len(requests):
        raise TLBackwardError(f"n_tune must be in [1, {len(requests) - 1}] for {len(requests)} requests, got {n_tune}",
                              argument="n_tune")
    layers = ad.layers(layers)
    if not etas:
        raise TLBackwardError("etas is empty: pass at least one step size", argument="etas")
    tune, held = requests[:n_tune], requests[n_tune:]

    grid = []
    for layer in layers:
        for eta in etas:
            s = evaluate_edits(model, tune, layer=layer, eta=eta, prepend_bos=prepend_bos, progress=False).summary()
            grid.append(GridPoint(layer=layer, eta=float(eta), efficacy=s["efficacy"], paraphrase=s["paraphrase"],
                                  neighborhood=s["neighborhood"], score=harmonic_score(s)))
        if progress:
            print(f"  tuned layer {layer}: best score "
                  f"{max(g.score for g in grid if g.layer == layer):.3f}", flush=True)
    best = max(grid, key=lambda g: (g.score, g.efficacy, -g.eta))
    edited = evaluate_edits(model, held, layer=best.layer, eta=best.eta, prepend_bos=prepend_bos,
                            progress=progress)
    baseline = evaluate_edits(model, held, prepend_bos=prepend_bos, progress=progress)
    out = EditingRun(grid=tuple(grid), chosen=best, edited=EditScores.of(edited), baseline=EditScores.of(baseline),
                     n_tune=len(tune), n_eval=len(held), seconds=time.perf_counter() - start)
    print(out.table())
    return out


def format_report(result: EditingRun) -> str:
    """``result.table()``: kept for code written when :func:`run` returned a dict."""
    return result.table()


__all__ = ["run", "format_report", "harmonic_score", "DEFAULT_ETAS", "EditingRun", "GridPoint", "EditScores"]
