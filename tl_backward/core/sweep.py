"""Dataset sweeps: stream batches, reduce sums, shard under ``torchrun``, resume from a checkpoint.

A sweep is a sum over batches: each batch's ``step`` returns float64 partial sums (per-head norms,
sums of squares, ...), the number of examples it covered and, optionally, one small record per
example (e.g. an edit's scores); the sweep adds the sums and keeps the records in dataset order.
Because only sums and small records travel, three things come for free:

* **Streaming**: batches are drawn from any iterable, one at a time; the dataset never sits in memory.
* **Data parallel**: when ``torch.distributed`` is initialised (``torchrun``; gloo on CPU, NCCL on
  GPU), batch ``k`` of the stream is computed by rank ``k mod world_size`` and the sums are
  ``all_reduce``-d at the end (records are gathered), so every rank returns the single-process
  result (up to the order of float64 additions; counts and records exactly).
* **Resume**: with ``checkpoint=path`` the partial sums and the number of batches drawn are written
  atomically (temporary file + ``os.replace``) every ``every`` batches; a restarted run with the same
  arguments skips the batches already summed and returns exactly what an uninterrupted run returns.
  Under ``torchrun`` each rank keeps its own file (``path.rank{r}-of-{w}``).

Sums whose shape may change along the sweep (mean maps cropped to the shortest prompt so far) pass
``combine``: it merges two partial sums in place of ``+``, within a rank and across ranks, where the
ranks' sums are gathered and folded in rank order (every rank folds the same list, so all agree).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch
from torch import Tensor

from tl_backward.errors import TLBackwardError

from . import checks

__all__ = ["Sums", "SweepResult", "batched", "checkpoint_part", "dataset_size", "rank_and_world", "run_sweep"]

T = TypeVar("T")
Sums = dict[str, Tensor]
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class SweepResult:
    """What a sweep returns on every rank: the summed tensors, the number of examples, and the
    per-example records in dataset order (empty when the steps return none)."""

    sums: Sums
    count: int
    records: tuple[Any, ...] = ()

    def __repr__(self) -> str:
        return f"SweepResult({self.count} examples, sums {sorted(self.sums)}, {len(self.records)} records)"


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised default process group, else ``(0, 1)``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def dataset_size(items: Any) -> int | None:
    """The number of examples when the dataset knows it (lists, tensors, ``datasets.Dataset``)."""
    try:
        return len(items)
    except TypeError:  # a generator or another plain iterable
        return None


def batched(items: Iterable[T], batch_size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``batch_size`` items (the last may be shorter), drawn lazily."""
    checks.count(batch_size, "batch_size", minimum=1)
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == batch_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def checkpoint_part(checkpoint: str | os.PathLike | None, part: str) -> Path | None:
    """The checkpoint file of one sub-sweep of a study (``path.part``), or None without checkpoint."""
    path = _checked_path(checkpoint)
    return None if path is None else path.with_name(f"{path.name}.{part}")


def _checked_path(checkpoint: Any) -> Path | None:
    """A ``checkpoint`` argument as a Path (None stays None); anything else is refused."""
    if checkpoint is None:
        return None
    if not isinstance(checkpoint, (str, os.PathLike)) or not str(checkpoint):
        raise TLBackwardError(f"checkpoint must be a file path (str or Path), got {type(checkpoint).__name__}",
                              argument="checkpoint")
    return Path(checkpoint)


def run_sweep(batches: Iterable[T], step: Callable[[T], tuple], *, fingerprint: str,
              checkpoint: str | os.PathLike | None = None, every: int = 1, progress: bool = False,
              desc: str = "sweep", total: int | None = None,
              combine: Callable[[Sums, Sums], Sums] | None = None) -> SweepResult:
    """Sum ``step(batch)`` over ``batches``, reduced over all ranks (see :class:`SweepResult`).

    ``step`` returns ``({name: float64 tensor}, examples in the batch)`` or ``(sums, n, records)``
    with a list of picklable per-example records; every batch must return the same names and
    shapes (an empty dict when the sweep only collects records). ``fingerprint`` describes the run's arguments: a checkpoint written by a
    run with another fingerprint or world size is refused, never mixed in. ``total``: examples in
    the dataset, for the progress bar (None = unknown). ``combine(a, b) -> sums``: merges two
    partial sums (float64, on the CPU) instead of adding them, for sums that are not shape-stable;
    it must be associative (the batches are grouped by rank, then the ranks folded in rank order).
    """
    checks.count(every, "every", minimum=1)
    checks.flag(progress, "progress")
    rank, world = rank_and_world()
    path = _rank_path(checkpoint, rank, world)
    sums, count, drawn, records = _load(path, fingerprint, world) if path is not None else ({}, 0, 0, [])
    from tqdm.auto import tqdm  # an optional display dependency, imported when a sweep runs

    with tqdm(total=total, desc=desc, unit="example", disable=not progress or rank != 0) as bar:
        bar.update(count * world if world > 1 else count)
        k = -1
        for k, batch in enumerate(batches):
            if k < drawn or k % world != rank:
                continue  # summed before the restart, or another rank's batch
            part, n, *own = step(batch)
            sums = _add(sums, part) if combine is None else _combined(sums, part, combine)
            count += n
            if own:
                records.append((k, list(own[0])))
            bar.update(n * world)
            if path is not None and (k // world + 1) % every == 0:
                _save(path, fingerprint, world, (sums, count, k + 1, records))
        if path is not None:
            _save(path, fingerprint, world, (sums, count, max(k + 1, drawn), records))
    if combine is None:
        sums, count = _all_reduce(sums, count, world)
    else:
        sums, count = _folded(sums, count, world, combine)
    return SweepResult(sums, count, _gathered(records, world))


def _add(sums: Sums, part: Sums) -> Sums:
    if sums and set(sums) != set(part):
        raise TLBackwardError(f"a sweep step returned sums {sorted(part)} after {sorted(sums)}", argument="step")
    moved = [k for k in sums if tuple(sums[k].shape) != tuple(part[k].shape)]
    if moved:
        raise TLBackwardError(f"a sweep step returned sums {moved} of shape {tuple(part[moved[0]].shape)} after "
                              f"{tuple(sums[moved[0]].shape)}: keep the shapes, or pass combine= to merge them",
                              argument="step")
    return {k: part[k].detach().to("cpu", torch.float64) + sums.get(k, 0) for k in part}


def _combined(sums: Sums, part: Sums, combine: Callable[[Sums, Sums], Sums]) -> Sums:
    part = {k: v.detach().to("cpu", torch.float64) for k, v in part.items()}
    return combine(sums, part) if sums else part


def _folded(sums: Sums, count: int, world: int, combine: Callable[[Sums, Sums], Sums]) -> tuple[Sums, int]:
    """Every rank's sums gathered and folded with ``combine`` in rank order (ranks without a batch skipped)."""
    if world == 1:
        return sums, count
    parts: list[Any] = [None] * world
    torch.distributed.all_gather_object(parts, (sums, count))
    out: Sums = {}
    for part, _ in parts:
        if part:
            out = combine(out, part) if out else part
    return out, sum(n for _, n in parts)


def _rank_path(checkpoint: Any, rank: int, world: int) -> Path | None:
    path = _checked_path(checkpoint)
    if path is None:
        return None
    if world > 1:
        path = path.with_name(f"{path.name}.rank{rank}-of-{world}")
    if not path.parent.is_dir():
        raise TLBackwardError(f"checkpoint: the folder {str(path.parent)!r} does not exist; create it first",
                              argument="checkpoint")
    return path


def _load(path: Path, fingerprint: str, world: int) -> tuple[Sums, int, int, list]:
    """The saved ``(sums, count, batches drawn, records)``, or a fresh start when there is no file."""
    if not path.exists():
        return {}, 0, 0, []
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # a torn or foreign file: refuse rather than guess
        raise TLBackwardError(f"checkpoint {str(path)!r} cannot be read ({type(err).__name__}): delete it to start "
                              "over", argument="checkpoint") from err
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise TLBackwardError(f"checkpoint {str(path)!r} is not a tl_backward sweep checkpoint: delete it or pass "
                              "another path", argument="checkpoint")
    if state["fingerprint"] != fingerprint or state["world"] != world:
        raise TLBackwardError(f"checkpoint {str(path)!r} belongs to another run ({state['fingerprint']}, "
                              f"{state['world']} process(es)); this run is ({fingerprint}, {world}): delete it or "
                              "pass another path", argument="checkpoint")
    return dict(state["sums"]), int(state["count"]), int(state["drawn"]), list(state["records"])


def _save(path: Path, fingerprint: str, world: int, state: tuple[Sums, int, int, list]) -> None:
    sums, count, drawn, records = state
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"version": CHECKPOINT_VERSION, "fingerprint": fingerprint, "world": world, "sums": sums,
                "count": count, "drawn": drawn, "records": records}, tmp)
    os.replace(tmp, path)  # atomic: a kill leaves the old file or the new one, never half of one


def _gathered(records: list[tuple[int, list]], world: int) -> tuple[Any, ...]:
    """Every rank's ``(batch index, records)`` pairs, merged in dataset order."""
    if world > 1:
        parts: list[Any] = [None] * world
        torch.distributed.all_gather_object(parts, records)
        records = [pair for part in parts for pair in part]
    return tuple(r for _, batch in sorted(records, key=lambda pair: pair[0]) for r in batch)


def _all_reduce(sums: Sums, count: int, world: int) -> tuple[Sums, int]:
    """Sum over ranks; a rank that drew no batch contributes zeros of the others' shapes."""
    if world == 1:
        return sums, count
    dist = torch.distributed
    shapes: list[Any] = [None] * world
    dist.all_gather_object(shapes, {k: tuple(v.shape) for k, v in sums.items()})
    names = next((s for s in shapes if s), {})
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out = {}
    for k, shape in names.items():
        t = sums.get(k, torch.zeros(shape, dtype=torch.float64)).to(device)
        dist.all_reduce(t)
        out[k] = t.cpu()
    n = torch.tensor([count], dtype=torch.long, device=device)
    dist.all_reduce(n)
    return out, int(n.item())
