"""Dataset-sweep throughput: batching, and data parallelism over processes with ``torchrun``.

GPT-2-small-shaped random bridge (12 layers, d_model 768, vocabulary 50,257), ``rank_heads`` over
N prompts of equal length (random token ids, so batching pads nothing), target = one fixed id.

(a) Batching: ``rank_heads(batch_size=8)`` vs ``batch_size=1``, prompts/s, medians of interleaved
    runs in this process (``--threads`` threads).
(b) Data parallel: the same sweep in 2 processes x 1 thread under ``torchrun`` (gloo; the sweep
    shards the batches over the ranks and all-reduces the sums, core/sweep.py) vs 1 process x 1
    thread, both at ``--parallel-batch-size`` (default 2). Each run times only the sweep (model
    built, ranks synchronised before and after), in fresh processes. Target: >= 1.7x on a 2-core
    machine. Why batch 2: at batch 8 the per-process working set (e.g. 8 x 64 x 3072 MLP
    activations) no longer fits the cores' caches, and two processes contend for memory bandwidth:
    measured here, the plain frozen-weight forward + backward (benchmarks/_common.py (c), no
    tl_backward at all) gains only 1.53x from a second process at batch 8, but 1.9x at batch 1-2.

Run: ``python benchmarks/bench_sweeps.py [--prompts N] [--tokens T] [--repeats R]``. Exit code 1 if
the data-parallel target is missed. (``--worker`` is the per-process entry point used by (b).)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _common import gpt2_small_random, interleaved_medians, random_tokens, ratio_line, set_threads  # noqa: E402

from tl_backward import rank_heads  # noqa: E402

PARALLEL_TARGET = 1.7
TARGET_ID = 1234


def sweep(model, tokens: torch.Tensor, batch_size: int) -> None:
    rank_heads(model, tokens, TARGET_ID, batch_size=batch_size, progress=False)


def worker(args: argparse.Namespace) -> None:
    """One process of (b): build, synchronise, time the sweep, print the time (rank 0)."""
    torch.set_num_threads(1)
    dist = torch.distributed
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    model = gpt2_small_random()
    tokens = random_tokens(args.prompts, args.tokens, 50257, seed=1)
    sweep(model, tokens[:args.batch_size], args.batch_size)  # warm-up, outside the timing
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    sweep(model, tokens, args.batch_size)
    if dist.is_initialized():
        dist.barrier()
    elapsed = time.perf_counter() - start
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"SWEEP_SECONDS {elapsed:.4f}")
    if dist.is_initialized():
        dist.destroy_process_group()


def timed_run(args: argparse.Namespace, processes: int) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--prompts", str(args.prompts),
           "--tokens", str(args.tokens), "--batch-size", str(args.parallel_batch_size)]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return float(next(line.split()[1] for line in out.splitlines() if line.startswith("SWEEP_SECONDS")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--parallel-batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--worker", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    threads = set_threads(args.threads)
    model = gpt2_small_random()
    tokens = random_tokens(args.prompts, args.tokens, 50257, seed=1)
    print(f"rank_heads, GPT-2-small shape, {args.prompts} prompts x {args.tokens} tokens")
    med = interleaved_medians({"batched": lambda: sweep(model, tokens, args.batch_size),
                               "single": lambda: sweep(model, tokens, 1)}, repeats=args.repeats)
    print(f"(a) {threads} threads: batch_size={args.batch_size} {args.prompts / med['batched']:.2f} prompts/s, "
          f"batch_size=1 {args.prompts / med['single']:.2f} prompts/s; "
          + ratio_line("speed-up", med["single"], med["batched"]))
    del model
    one, two = [], []
    for _ in range(args.repeats):  # interleaved: background load hits both alike
        one.append(timed_run(args, 1))
        two.append(timed_run(args, 2))
    t1, t2 = sorted(one)[len(one) // 2], sorted(two)[len(two) // 2]
    speedup = t1 / t2
    print(f"(b) batch_size={args.parallel_batch_size}: 1 process x 1 thread {t1:.2f} s, 2 processes x 1 thread "
          f"{t2:.2f} s (medians of {args.repeats}): "
          f"speed-up {speedup:.2f}x  (target >= {PARALLEL_TARGET:.2f}: {'ok' if speedup >= PARALLEL_TARGET else 'MISS'})")
    return 0 if speedup >= PARALLEL_TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
