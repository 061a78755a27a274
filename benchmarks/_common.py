"""Shared benchmark helpers: a GPT-2-small-shaped random model, robust timing, per-call peak
memory, and the reference forward+backward runs every capture-style feature is compared against.

Reference runs (the same model, input and loss -- the target's NLL at the last position):

* (a) :func:`plain_backward` -- a training-style step: trainable weights, ``loss.backward()``
  (parameter ``.grad`` allocated and written; reset to ``None`` before each call so every call pays
  for it, as a fresh training step would).
* (c) :func:`activation_grads_only` -- the floor for any analysis that reads activation gradients:
  frozen weights, a leaf at ``hook_embed``/``hook_pos_embed``, only the last position unembedded
  (the loss reads nothing else; tl_backward does the same, core/stream.py), ``torch.autograd.grad``
  to the leaves, no other hook. Nothing is kept.

Peak memory on CPU (:func:`peak_memory`): ``tracemalloc`` does not see torch's allocations and
torch has no CPU equivalent of ``cuda.max_memory_allocated``, so we measure the **resident-set
high-water mark** of this process around one call. Linux lets a process reset its own high-water
mark (``echo 5 > /proc/self/clear_refs``), so the peak is per call, in-process:
``peak = VmHWM(after call) - VmRSS(before call)``. For that to track live tensors, freed memory must
leave the RSS at once: the first :func:`peak_memory` call sets glibc ``mallopt`` so that every
allocation of >= 64 KiB is its own ``mmap`` (returned to the OS on free, no dynamic threshold
growth) and the heap is trimmed eagerly; torch's CPU allocator does not cache. The setting stays for
the rest of the process and makes every large allocation pay page faults, which slows copy-heavy
code more than compute-heavy code: time first, or measure memory in a fresh process
(:func:`in_fresh_process`). Pages count once touched, which every real tensor is. What it measures: the extra resident memory a call needs at its worst moment
(graph, saved activations, gradients, results), in MiB. Linux + glibc only; elsewhere
:func:`peak_memory` returns ``nan``.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

__all__ = [
    "gpt2_small_random", "random_tokens", "median_time", "interleaved_medians", "peak_memory",
    "last_token_nll", "plain_backward", "status_kib", "activation_grads_only", "set_threads", "MEMORY_METHOD",
    "in_fresh_process",
]

MEMORY_METHOD = "RSS high-water mark per call (/proc/self/clear_refs reset, mallopt mmap threshold 64 KiB)"

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _tune_malloc() -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024))
    except (OSError, AttributeError):
        return False


_MALLOC_TUNED: bool | None = None  # tuned on the first peak_memory() call, not at import


def set_threads(n: int | None = None) -> int:
    """Use ``n`` threads (default: min(2, cores)) and return the count."""
    torch.set_num_threads(n or max(1, min(2, os.cpu_count() or 1)))
    return torch.get_num_threads()


def gpt2_small_random(vocab_size: int = 50257, *, n_ctx: int = 1024, seed: int = 0):
    """A random-weight TransformerBridge shaped like GPT-2 small (12 layers, d_model 768, 12 heads,
    d_mlp 3072, 124M parameters at the full vocabulary), fp32, eval mode, offline."""
    from tl_backward.zoo.tiny import tiny_model

    return tiny_model("gpt2", seed=seed, n_layers=12, d_model=768, n_heads=12, d_mlp=3072,
                      n_ctx=n_ctx, vocab_size=vocab_size)


def random_tokens(batch: int, length: int, vocab_size: int, *, seed: int = 0) -> torch.Tensor:
    """Token ids ``[batch, length]`` avoiding the four special ids of the tiny tokenizers."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab_size, (batch, length), generator=gen)


def median_time(fn: Callable[[], Any], repeats: int = 5, *, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int = 5, *,
                        warmup: int = 1) -> dict[str, float]:
    """Median wall time of each function, calling them round-robin so that background load on a
    shared machine hits every contender alike (ratios stay meaningful when absolute times drift)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def in_fresh_process(script: str, argv: Sequence[str]) -> str:
    """Run ``python script *argv`` in a new process and return the last line it printed.

    For memory measurements: the child starts with a clean heap, and the allocator tuning they
    need never reaches the process that does the timing.
    """
    proc = subprocess.run([sys.executable, os.path.abspath(script), *argv], capture_output=True, text=True,
                          check=True)
    return proc.stdout.strip().splitlines()[-1]


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(fn: Callable[[], Any], repeats: int = 1) -> float:
    """Peak extra resident memory (MiB) of one call of ``fn()`` -- the median over ``repeats`` calls.

    The call's return value is dropped before the next call (its size still counts in the peak).
    Returns ``nan`` where the method is unavailable (non-Linux, no glibc); see the module docstring.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED is None:
        _MALLOC_TUNED = _tune_malloc()
    if not _MALLOC_TUNED or not os.path.exists("/proc/self/clear_refs"):
        return math.nan
    peaks = []
    for _ in range(repeats):
        gc.collect()
        before = status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            return math.nan
        out = fn()
        peak = status_kib("VmHWM")
        del out
        peaks.append((peak - before) / 1024)
    return statistics.median(peaks)


def last_token_nll(target: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``logits -> Σ_b −log p(target)`` at the last position (the loss every reference run uses)."""

    def loss(logits: torch.Tensor) -> torch.Tensor:
        return -torch.log_softmax(logits[:, -1].float(), -1)[:, target].sum()

    return loss


def plain_backward(model: Any, tokens: torch.Tensor, target: int) -> Callable[[], None]:
    """(a) Training-style forward + ``loss.backward()`` with trainable weights (``.grad`` reset to
    None before each call, so each call allocates and fills the weight gradients)."""
    loss_fn = last_token_nll(target)
    params = list(model.parameters())

    def run() -> None:
        for p in params:
            p.grad = None
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        try:
            with torch.enable_grad():
                loss_fn(model(tokens, return_type="logits")).backward()
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)
                p.grad = None

    return run


def activation_grads_only(model: Any, tokens: torch.Tensor, target: int) -> Callable[[], None]:
    """(c) Frozen weights + fresh leaves at the embedding hooks, ``torch.autograd.grad`` to the
    leaves only: the cost floor of reading any activation gradient."""
    loss_fn = last_token_nll(target)
    params = list(model.parameters())
    names = [n for n in ("hook_embed", "hook_pos_embed") if n in model.hook_dict]

    def run() -> None:
        leaves: list[torch.Tensor] = []

        def make_leaf(t: torch.Tensor, hook: Any) -> torch.Tensor:
            leaf = t.detach().requires_grad_(True)
            leaves.append(leaf)
            return leaf

        def last_only(t: torch.Tensor, hook: Any) -> torch.Tensor:
            return t[:, -1:]

        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            hooks = [(n, make_leaf) for n in names] + [("unembed.hook_in", last_only)]
            with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
                loss = loss_fn(model(tokens, return_type="logits"))
                torch.autograd.grad(loss, leaves)
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)

    return run


def ratio_line(label: str, value: float, reference: float, target: float | None = None) -> str:
    """``label: value / reference = ratio [target ok|MISS]``."""
    r = value / reference if reference else math.nan
    mark = "" if target is None else (f"  (target <= {target:.2f}: {'ok' if r <= target else 'MISS'})")
    return f"{label}: {r:.3f}x{mark}"


def fmt_row(cells: Sequence[Any], widths: Sequence[int]) -> str:
    return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))
