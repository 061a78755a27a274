"""MAS cost: forward time under the segment mask vs plain causal, and mask construction time.

1. A GPT-2-small-shaped random bridge (12 layers, d_model 768, 12 heads, vocab 50257) on 4 x 256
   tokens: median forward time inside ``segment_mask`` vs the plain causal forward (interleaved
   runs, no_grad). Target ratio <= 1.05. The explicit 4-D *causal* mask is timed too, to separate
   "4-D mask path" from "MAS pattern".
2. Building the 4-D keep-mask (row_end + staircase comparison) for 32 x 2048 tokens.

Run: ``python benchmarks/bench_mas.py [--repeats N] [--threads T]``. The pass/fail ratio uses process
CPU time (robust to other jobs on a shared machine: time spent descheduled is not counted, the work
itself is); wall time is printed too and should agree on a quiet machine. With several threads, CPU
time also counts OpenMP spin-waits, so ``--threads 1`` gives the cleanest ratio. Exit code 1 if the
CPU-time ratio misses the target.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from tl_backward.masking import segment_mask
from tl_backward.masking import segments as S
from tl_backward.masking.rule import row_end, staircase_mask
from tl_backward.zoo.tiny import tiny_model

TARGET = 1.05


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed_cpu(fn) -> tuple[float, float]:
    """(wall, process CPU) seconds; CPU time is less sensitive to other jobs on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def layout(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Random chat-like layout per row: 2-4 blocks covering ~3/4 of the row, then a causal tail."""
    ids = torch.full((batch, length), -1, dtype=torch.long)
    for b in range(batch):
        n_blocks = int(torch.randint(2, 5, (1,), generator=gen))
        cuts = sorted(torch.randint(1, 3 * length // 4, (n_blocks - 1,), generator=gen).tolist())
        bounds = [0, *dict.fromkeys(cuts), 3 * length // 4]
        for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            ids[b, lo:hi] = k
    return ids


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                        help="torch threads (use 1 on a busy machine: oversubscription makes timings noisy)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)

    model = tiny_model("gpt2", n_layers=12, d_model=768, n_heads=12, d_mlp=3072, n_ctx=1024, vocab_size=50257)
    tokens = torch.randint(4, 50257, (4, 256), generator=gen)
    seg = S.from_ids(tokens, layout(4, 256, gen))
    causal4d = seg.causal().mask()

    runs = {"causal": [], "mas": [], "causal_4d": []}
    with torch.no_grad(), segment_mask(model, seg) as _:
        pass  # warm the code path once
    with torch.no_grad():
        for _ in range(2):  # warm-up
            model(tokens)
        for _ in range(args.repeats):
            runs["causal"].append(timed_cpu(lambda: model(tokens)))
            with segment_mask(model, seg):
                runs["mas"].append(timed_cpu(lambda: model(tokens)))
            runs["causal_4d"].append(timed_cpu(lambda: model(tokens, attention_mask=causal4d)))
    med = {k: statistics.median(w for w, _ in v) for k, v in runs.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
    ratio = med["mas"] / med["causal"]
    cpu_ratio = cpu["mas"] / cpu["causal"]

    big_ids = layout(32, 2048, gen)
    big_valid = torch.ones(32, 2048, dtype=torch.bool)
    staircase_mask(row_end(big_ids), big_valid)  # warm-up
    # From segment ids to the full [32, 1, 2048, 2048] mask, nothing cached.
    build = statistics.median(timed(lambda: staircase_mask(row_end(big_ids), big_valid)) for _ in range(5))
    ends = statistics.median(timed(lambda: row_end(big_ids)) for _ in range(5))

    print(f"forward 4x256, GPT-2-small shape, {torch.get_num_threads()} threads, median of {args.repeats} "
          "(wall / process CPU):")
    print(f"  plain causal        {med['causal'] * 1e3:8.1f} / {cpu['causal'] * 1e3:8.1f} ms")
    print(f"  segment_mask (MAS)  {med['mas'] * 1e3:8.1f} / {cpu['mas'] * 1e3:8.1f} ms   "
          f"ratio MAS/causal = {ratio:.3f} wall, {cpu_ratio:.3f} CPU (target <= {TARGET})")
    print(f"  explicit 4-D causal {med['causal_4d'] * 1e3:8.1f} / {cpu['causal_4d'] * 1e3:8.1f} ms   "
          f"ratio = {med['causal_4d'] / med['causal']:.3f} wall, {cpu['causal_4d'] / cpu['causal']:.3f} CPU")
    print(f"mask construction 32x2048 (bool [32,1,2048,2048], {32 * 2048 * 2048 / 2**20:.0f} Mi entries): "
          f"{build * 1e3:.1f} ms (row_end alone {ends * 1e3:.2f} ms)")
    ok = cpu_ratio <= TARGET  # process CPU time: wall time is noisy on a shared machine
    print("PASS" if ok else "FAIL: MAS forward slower than target")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
