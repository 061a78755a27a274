"""Dataset sweeps: stream batches, reduce sums, shard under ``torchrun``, resume from a checkpoint.

A sweep is a sum over batches: each batch's ``step`` returns float64 partial sums (per-head norms,
sums of squares, ...) and the number of examples it covered; the sweep adds them up. Because only
sums travel, three things come for free:

* **Streaming**: batches are drawn from any iterable, one at a time; the dataset never sits in memory.
* **Data parallel**: when ``torch.distributed`` is initialised (``torchrun``; gloo on CPU, NCCL on
  GPU), batch ``k`` of the stream is computed by rank ``k mod world_size`` and the sums are
  ``all_reduce``-d at the end, so every rank returns the single-process result (up to the order of
  float64 additions; counts exactly).
* **Resume**: with ``checkpoint=path`` the partial sums and the number of batches drawn are written
  atomically (temporary file + ``os.replace``) every ``every`` batches; a restarted run with the same
  arguments skips the batches already summed and returns exactly what an uninterrupted run returns.
  Under ``torchrun`` each rank keeps its own file (``path.rank{r}-of-{w}``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch
from torch import Tensor

from tl_backward.errors import TLBackwardError

from . import checks

__all__ = ["Sums", "batched", "rank_and_world", "run_sweep"]

T = TypeVar("T")
Sums = dict[str, Tensor]
CHECKPOINT_VERSION = 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised default process group, else ``(0, 1)``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


def run_sweep(batches: Iterable[T], step: Callable[[T], tuple[Sums, int]], *, fingerprint: str,
              checkpoint: str | os.PathLike | None = None, every: int = 1, progress: bool = False,
              desc: str = "sweep", total: int | None = None) -> tuple[Sums, int]:
    """Sum ``step(batch)`` over ``batches``; returns ``(sums, n_examples)`` reduced over all ranks.

    ``step`` returns ``({name: float64 tensor}, examples in the batch)``; every batch must return the
    same names and shapes. ``fingerprint`` describes the run's arguments: a checkpoint written by a
    run with another fingerprint or world size is refused, never mixed in. ``total``: examples in
    the dataset, for the progress bar (None = unknown).
    """
    checks.count(every, "every", minimum=1)
    checks.flag(progress, "progress")
    rank, world = rank_and_world()
    path = _rank_path(checkpoint, rank, world)
    sums, count, drawn = _load(path, fingerprint, world) if path is not None else ({}, 0, 0)
    from tqdm.auto import tqdm  # an optional display dependency, imported when a sweep runs

    with tqdm(total=total, desc=desc, unit="example", disable=not progress or rank != 0) as bar:
        bar.update(count * world if world > 1 else count)
        k = -1
        for k, batch in enumerate(batches):
            if k < drawn or k % world != rank:
                continue  # summed before the restart, or another rank's batch
            part, n = step(batch)
            sums = _add(sums, part)
            count += n
            bar.update(n * world)
            if path is not None and (k // world + 1) % every == 0:
                _save(path, fingerprint, world, sums, count, k + 1)
        if path is not None:
            _save(path, fingerprint, world, sums, count, max(k + 1, drawn))
    return _all_reduce(sums, count, world)


def _add(sums: Sums, part: Sums) -> Sums:
    if sums and set(sums) != set(part):
        raise TLBackwardError(f"a sweep step returned sums {sorted(part)} after {sorted(sums)}", argument="step")
    return {k: part[k].detach().to("cpu", torch.float64) + sums.get(k, 0) for k in part}


def _rank_path(checkpoint: Any, rank: int, world: int) -> Path | None:
    if checkpoint is None:
        return None
    if not isinstance(checkpoint, (str, os.PathLike)) or not str(checkpoint):
        raise TLBackwardError(f"checkpoint must be a file path (str or Path), got {type(checkpoint).__name__}",
                              argument="checkpoint")
    path = Path(checkpoint)
    if world > 1:
        path = path.with_name(f"{path.name}.rank{rank}-of-{world}")
    if not path.parent.is_dir():
        raise TLBackwardError(f"checkpoint: the folder {str(path.parent)!r} does not exist; create it first",
                              argument="checkpoint")
    return path


def _load(path: Path, fingerprint: str, world: int) -> tuple[Sums, int, int]:
    """The saved ``(sums, count, batches drawn)``, or a fresh start when there is no file."""
    if not path.exists():
        return {}, 0, 0
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
    return dict(state["sums"]), int(state["count"]), int(state["drawn"])


def _save(path: Path, fingerprint: str, world: int, sums: Sums, count: int, drawn: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"version": CHECKPOINT_VERSION, "fingerprint": fingerprint, "world": world, "sums": sums,
                "count": count, "drawn": drawn}, tmp)
    os.replace(tmp, path)  # atomic: a kill leaves the old file or the new one, never half of one


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
