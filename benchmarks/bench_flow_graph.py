"""Flow-graph cost on a GPT-2-small-shaped random model (12 layers, d_model 768, 12 heads,
d_mlp 3072, vocabulary 50257): building + saving one layer's graph vs one forward pass.

Target (issue 7): forward graph build + save <= 3x one forward pass; saved HTML < 500 kB per layer.
Timings are interleaved medians (2 shared CPU cores: noisy); ratios are measured in this run.

    python benchmarks/bench_flow_graph.py [--threads N] [--repeats R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tl_backward.flow import flow_graph  # noqa: E402
from tl_backward.zoo.tiny import tiny_model  # noqa: E402

N_POS, LAYER, REPEATS = 24, 6, 7


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                    help="torch threads (1 is steadier when other jobs share the cores)")
    ap.add_argument("--repeats", type=int, default=REPEATS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = tiny_model("gpt2", seed=0, n_layers=12, d_model=768, n_heads=12, d_mlp=3072, n_ctx=1024,
                       vocab_size=50257)
    print(f"model built in {time.perf_counter() - t0:.1f}s: GPT-2-small shape, vocab {model.W_U.shape[-1]}, "
          f"prompt {N_POS} tokens, layer {LAYER}, threads {torch.get_num_threads()}")
    tokens = torch.randint(4, 50257, (1, N_POS), generator=torch.Generator().manual_seed(0))
    tmp = Path(tempfile.mkdtemp(prefix="bench-flow-"))

    def forward() -> None:
        with torch.no_grad():
            model(tokens)

    def graph(backward: bool) -> int:
        g = flow_graph(model, tokens, layer=LAYER, backward=backward)
        return g.save(tmp / f"g{int(backward)}.html").stat().st_size

    def hf_forward() -> None:
        with torch.no_grad():
            model.original_model(tokens)

    # Warm-up: the first passes over freshly allocated weights are several times slower here
    # (first-touch page faults in the VM), for every variant alike.
    for _ in range(2):
        forward(), hf_forward(), graph(False), graph(True)
    times: dict[str, list[float]] = {"forward": [], "hf": [], "graph": [], "bgraph": []}
    sizes = {}
    for _ in range(args.repeats):
        for key, fn in (("forward", forward), ("hf", hf_forward), ("graph", lambda: graph(False)),
                        ("bgraph", lambda: graph(True))):
            t = time.perf_counter()
            out = fn()
            times[key].append(time.perf_counter() - t)
            if out is not None:
                sizes[key] = out
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"one forward pass (bridge, no_grad) median {med['forward'] * 1e3:7.1f} ms   "
          f"(plain HF model: {med['hf'] * 1e3:.1f} ms)")
    print(f"forward graph: build + save       median {med['graph'] * 1e3:7.1f} ms   "
          f"ratio {med['graph'] / med['forward']:.2f}x  (target <= 3x)   HTML {sizes['graph'] / 1e3:.0f} kB (target < 500)")
    print(f"backward graph: build + save      median {med['bgraph'] * 1e3:7.1f} ms   "
          f"ratio {med['bgraph'] / med['forward']:.2f}x  (reported; includes one forward+backward)   "
          f"HTML {sizes['bgraph'] / 1e3:.0f} kB")
    # Per-round ratios (each round runs the variants back to back): robust to load that changes
    # between rounds on a shared machine, unlike a ratio of medians taken at different moments.
    per_round = sorted(g / f for g, f in zip(times["graph"], times["forward"]))
    print(f"forward graph / forward pass per round: median {statistics.median(per_round):.2f}x "
          f"(min {per_round[0]:.2f}x, max {per_round[-1]:.2f}x, {len(per_round)} rounds)")
    ok = med["graph"] <= 3 * med["forward"] and max(sizes.values()) < 500_000
    print(f"forward graph vs the plain-HF forward (for reference): {med['graph'] / med['hf']:.2f}x")
    print("PASS" if ok else "FAIL: forward graph slower than 3x a forward pass or HTML too large")


if __name__ == "__main__":
    main()
