"""Reversed Attention cost: RA for all 144 heads of a GPT-2-small-shaped random model vs the
reference forward+backward runs, and streaming head-ranking throughput.

1. Input 1 x 128 and 1 x 512 tokens, loss = NLL of one target at the last position:
   ``reversed_attention(model, tokens, target)`` (all 12 layers x 12 heads, maps + patterns
   returned) vs (a) plain forward + ``loss.backward()`` with trainable weights and (c) the
   activation-gradients-only floor (frozen weights, leaf at hook_embed, ``autograd.grad``); both
   from ``_common``. Wall time: median of interleaved runs in this process.
   Peak memory: each contender in a **fresh subprocess** (build the model, one warm-up call, then
   measure), two ways -- (i) RSS: VmHWM after one call minus VmRSS before it, with glibc tuned so
   freed memory leaves the RSS (every allocation >= 64 KiB its own mmap; ``/proc/self/clear_refs``
   resets the high-water mark); (ii) tensors: the peak of live CPU tensor bytes from
   ``torch.profiler`` memory events, which counts a tensor in full when allocated (as a GPU
   allocator would) and is blind to page reclaim and malloc caching. The returned maps count in
   both. Fresh processes because the GPT-2 bridge keeps each layer's last pattern
   (``JointQKVAttentionBridge._pattern``) until the next forward, so in-process baselines depend on
   what ran before. Targets: <= 1.0x (a) and <= 1.15x (c), time and both memory figures, both lengths.
2. ``rank_heads`` over 64 prompts of 128 tokens (batch 8): prompts/second, interleaved with the
   (c) floor over the same batches.
3. Long context, 1 x 2,048 tokens (``--long-length``): peak memory (both ways, fresh processes) of
   ``reversed_attention(..., keep="norms")`` and ``keep="topk"`` (top 16 edges per head), which reduce
   each layer's map inside the backward, vs the (c) floor; target: norms <= 1.1x (c), RSS and tensors.
   Full-map RA (``keep="maps"``, all 12 layers' maps + patterns returned) is printed for contrast.

Run: ``python benchmarks/bench_reversed_attention.py [--repeats N] [--lengths 128 512] [--threads T]
[--sections short ranking long] [--long-length 2048]``.
Exit code 1 if a target is missed. On a shared 2-core machine absolute times drift; the ratios come
from interleaved runs and are the figures to read (rerun if other jobs were busy).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _common import (activation_grads_only, gpt2_small_random, interleaved_medians,  # noqa: E402
                     in_fresh_process, plain_backward, random_tokens, set_threads, status_kib)

from tl_backward.attention import rank_heads, reversed_attention  # noqa: E402

TARGET_A, TARGET_C = 1.0, 1.15
TARGET_LONG = 1.1  # keep="norms" vs (c) at 2,048 tokens
TOP_K = 16
TARGET_TOKEN = 1234
LABELS = {"ra": "reversed_attention, 144 heads", "a": "(a) forward + .backward(), trainable",
          "c": "(c) activation gradients only"}
LONG_LABELS = {"c": "(c) activation gradients only", "norms": 'RA keep="norms"',
               "topk": f'RA keep="topk", top_k={TOP_K}', "ra": 'RA keep="maps" (full maps)'}


def contenders(model, tokens):
    return {"ra": lambda: reversed_attention(model, tokens, TARGET_TOKEN),
            "a": plain_backward(model, tokens, TARGET_TOKEN),
            "c": activation_grads_only(model, tokens, TARGET_TOKEN),
            "norms": lambda: reversed_attention(model, tokens, TARGET_TOKEN, keep="norms"),
            "topk": lambda: reversed_attention(model, tokens, TARGET_TOKEN, keep="topk", top_k=TOP_K)}


# ------------------------------------------------------------------------------ memory (subprocess)
def rss_peak(fn, libc) -> float:
    """Extra resident memory (MiB) at the worst moment of one ``fn()`` call (return value included)."""
    gc.collect()
    libc.malloc_trim(0)
    before = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    out = fn()
    peak = status_kib("VmHWM")
    del out
    return (peak - before) / 1024


def tensor_peak(fn) -> float:
    """Peak of live CPU tensor memory (MiB) during one ``fn()`` call, above the level at its start
    (``torch.profiler`` "Total Allocated" after each allocation/free; the return value counts)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    mem = sorted((e["ts"], e["args"]["Total Allocated"], e["args"]["Bytes"]) for e in events
                 if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0)
    start = mem[0][1] - mem[0][2]  # the level before the first event
    return (max(total for _, total, _ in mem) - start) / 2**20


def measure_one(key: str, length: int) -> dict:
    """Child process: glibc tuned at start, model built, one warm-up call, then both peaks."""
    libc = ctypes.CDLL("libc.so.6")
    if not (libc.mallopt(-3, 64 * 1024) and libc.mallopt(-1, 128 * 1024)):  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
        raise RuntimeError("mallopt failed: RSS peaks need glibc")
    model = gpt2_small_random(n_ctx=max(1024, length))
    fn = contenders(model, random_tokens(1, length, model.cfg.d_vocab, seed=length))[key]
    fn()  # warm-up: lazy initialisation, and the bridge's retained patterns, as in steady use
    rss = min(rss_peak(fn, libc) for _ in range(2))
    return {"rss": rss, "tensors": tensor_peak(fn)}


def measure(key: str, length: int, threads: int) -> dict:
    return json.loads(in_fresh_process(__file__, ["--measure", key, str(length), "--threads", str(threads)]))


def long_context(length: int, threads: int) -> bool:
    """Section 3: reductions-only RA vs the floor (and full maps) at ``length`` tokens, memory only."""
    memory = {k: measure(k, length, threads) for k in LONG_LABELS}
    layer_mib = 12 * length * length * 4 / 2**20
    print(f"\n1 x {length} tokens, peak memory per contender in a fresh process (one layer's maps: "
          f"{layer_mib:.1f} MiB; all layers' maps + patterns: {2 * 12 * layer_mib:.1f} MiB):")
    for key, label in LONG_LABELS.items():
        print(f"  {label:38s} peak RSS +{memory[key]['rss']:8.1f} MiB   peak tensors +{memory[key]['tensors']:8.1f} MiB")
    ok = True
    for key in ("norms", "topk", "ra"):
        ratios = {m: memory[key][m] / memory["c"][m] for m in ("rss", "tensors")}
        line = "   ".join(f"{m} {r:.3f}x" for m, r in ratios.items())
        if key == "norms":
            marks = [r <= TARGET_LONG for r in ratios.values()]
            ok &= all(marks)
            line += f"   [{'ok' if all(marks) else 'MISS'}] (target <= {TARGET_LONG:.2f}x)"
        print(f"  {LONG_LABELS[key]} / (c):  {line}")
    return ok


# ------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sections", nargs="+", choices=("short", "ranking", "long"),
                        default=["short", "ranking", "long"])
    parser.add_argument("--long-length", type=int, default=2048)
    parser.add_argument("--measure", nargs=2, metavar=("KEY", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    if args.measure:
        print(json.dumps(measure_one(args.measure[0], int(args.measure[1]))))
        return 0
    model = gpt2_small_random() if {"short", "ranking"} & set(args.sections) else None
    vocab = 50257
    print(f"GPT-2-small-shaped random bridge (12 layers x 12 heads, d_model 768, vocab {vocab}), fp32, "
          f"{threads} thread(s); peak memory per contender in a fresh process (RSS and live tensors)")
    ok = True
    for length in args.lengths if "short" in args.sections else ():
        tokens = random_tokens(1, length, vocab, seed=length)
        runs = {k: fn for k, fn in contenders(model, tokens).items() if k in LABELS}
        times = interleaved_medians(runs, repeats=args.repeats)
        res = runs["ra"]()
        assert res.maps.shape == (12, 1, 12, length, length)
        maps_mib = (res.maps.numel() + res.patterns.numel()) * 4 / 2**20
        del res
        memory = {k: measure(k, length, threads) for k in runs}
        print(f"\n1 x {length} tokens, median of {args.repeats} interleaved runs:")
        for key, label in LABELS.items():
            print(f"  {label:38s} {times[key] * 1e3:8.1f} ms   peak RSS +{memory[key]['rss']:7.1f} MiB"
                  f"   peak tensors +{memory[key]['tensors']:7.1f} MiB")
        print(f"  (result: maps + patterns = {maps_mib:.1f} MiB, included in the RA peaks)")
        for ref, tgt in (("a", TARGET_A), ("c", TARGET_C)):
            ratios = {"time": times["ra"] / times[ref], "RSS": memory["ra"]["rss"] / memory[ref]["rss"],
                      "tensors": memory["ra"]["tensors"] / memory[ref]["tensors"]}
            marks = {k: r <= tgt for k, r in ratios.items()}
            ok &= all(marks.values())
            print(f"  RA / ({ref}):  " + "   ".join(f"{k} {r:.3f}x [{'ok' if marks[k] else 'MISS'}]"
                                              for k, r in ratios.items()) + f"   (target <= {tgt:.2f}x)")

    if "long" in args.sections:
        ok &= long_context(args.long_length, threads)
    if "ranking" in args.sections:
        ranking_throughput(model, args.prompts, args.batch_size)
    print("\nall targets met" if ok else "\nSOME TARGETS MISSED")
    return 0 if ok else 1


def ranking_throughput(model, n: int, bs: int) -> None:
    """Section 2: streaming head ranking vs the floor over the same batches."""
    vocab = model.cfg.d_vocab
    prompts = random_tokens(n, 128, vocab, seed=7)
    targets = random_tokens(1, n, vocab, seed=8)[0].tolist()
    floors = [activation_grads_only(model, prompts[i:i + bs], targets[i]) for i in range(0, n, bs)]
    out = {}

    def ranking():
        out["r"] = rank_heads(model, prompts, targets, batch_size=bs, progress=False)

    def floor():
        for f in floors:
            f()

    secs = interleaved_medians({"rank": ranking, "floor": floor}, repeats=2)
    print(f"\nrank_heads: {n} prompts x 128 tokens, batch {bs}: {secs['rank']:.2f} s = "
          f"{n / secs['rank']:.1f} prompts/s; (c) floor over the same batches {n / secs['floor']:.1f} prompts/s "
          f"(ratio {secs['rank'] / secs['floor']:.3f}x); top heads "
          + ", ".join(f"L{l}H{h}" for l, h, _ in out["r"].top(3)))


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
