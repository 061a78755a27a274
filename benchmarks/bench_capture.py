"""capture() vs a plain backward and vs the activation-gradient floor, GPT-2-small shape, 1 x 128.

(a) plain forward + ``loss.backward()`` with trainable weights (weight gradients computed);
(b) ``tl_backward.capture`` of every layer's pattern, attn_scores, resid_pre/mid/post
    (activations and gradients kept: 5 x 12 hook points);
(c) frozen weights + leaf at the embeddings, activation gradients only, nothing kept.
Targets: (b)/(a) <= 1.0 and (b)/(c) <= 1.15. Run: ``python benchmarks/bench_capture.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (MEMORY_METHOD, activation_grads_only, gpt2_small_random, in_fresh_process,  # noqa: E402
                     interleaved_medians, peak_memory, plain_backward, random_tokens, set_threads)

import tl_backward as tlb  # noqa: E402

NAMES = ("hook_pattern", "hook_attn_scores", "hook_resid_pre", "hook_resid_mid", "hook_resid_post")


def contenders(length: int) -> dict:
    model = gpt2_small_random()
    tokens = random_tokens(1, length, model.cfg.d_vocab)
    target = 5
    metric = tlb.metrics.target_nll(target)
    runs = {
        "a": plain_backward(model, tokens, target),
        "b": lambda: tlb.capture(model, tokens, metric, names=lambda n: n.endswith(NAMES)),
        "c": activation_grads_only(model, tokens, target),
    }
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)  # the (b)/(c) margin is small: median of many
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--measure", choices=["a", "b", "c"], help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    threads = set_threads(args.threads)
    runs = contenders(args.length)
    if args.measure:
        runs[args.measure]()  # warm-up
        print(peak_memory(runs[args.measure], repeats=3))
        return
    cache = runs["b"]()
    times = interleaved_medians(runs, repeats=args.repeats)
    memory = {k: float(in_fresh_process(__file__, ["--measure", k, "--length", str(args.length),
                                                   "--threads", str(threads)])) for k in runs}
    print(f"bench_capture: GPT-2-small shape, 1 x {args.length} tokens, {threads} threads, "
          f"{len(cache.keys())} hook points captured")
    labels = {"a": "plain forward+backward (trainable)", "b": "capture (5 hooks x 12 layers)",
              "c": "activation-gradient floor"}
    for key, label in labels.items():
        print(f"  ({key}) {label:38s} median {times[key] * 1e3:8.1f} ms   peak +{memory[key]:7.1f} MiB")
    print(f"  ratio time (b)/(a) = {times['b'] / times['a']:.3f}   (target <= 1.0)")
    print(f"  ratio time (b)/(c) = {times['b'] / times['c']:.3f}   (target <= 1.15)")
    print(f"  ratio peak memory (b)/(a) = {memory['b'] / memory['a']:.3f}, (b)/(c) = {memory['b'] / memory['c']:.3f}")
    print(f"  memory method: {MEMORY_METHOD}")


if __name__ == "__main__":
    main()
