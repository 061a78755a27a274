"""Report cost: ``build_report`` against one ``capture`` of the same prompt, and its passes counted.

GPT-2-small-shaped random bridge (12 layers, d_model 768, 12 heads, d_mlp 3072, vocabulary
50,257), one prompt of 128 tokens (words of the tiny tokenizer), target = one fixed word.

(a) Passes: forwards are counted at the embedding (a forward pre-hook on ``model.embed``: every
    forward of the model runs it once); backwards are counted by wrapping ``torch.autograd.grad``
    and ``Tensor.backward`` for the duration of one report. Target: one backward, at most two
    forwards (one forward + backward for RA, Backward Lens factors and the backward flow graph;
    at most one more forward for the prediction and the forward graph).
(b) Time: ``build_report(model, prompt, target=..., flow=True)`` against
    ``capture(model, prompt, target)`` (every hook point, the call a user makes), medians of
    interleaved runs. Target: ratio <= 1.3.

(c) Floor: the page's content has a cost no pass layout removes -- the vocabulary readouts of
    the Backward Lens cells and the flow-graph nodes (each a [rows, d_model] x [d_model, d_vocab]
    matmul with top-k/ranks). Every ``Unembed.readout`` call of one report is recorded and replayed
    on the same tensors; ``build_report`` is compared with ``capture`` + that replay, i.e. what
    is left is orchestration, factor assembly and page rendering.

Run: ``python benchmarks/bench_report.py [--repeats N] [--threads T] [--tokens N]``. Exit code 1
if a target is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any, Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _common import gpt2_small_random, interleaved_medians, ratio_line, set_threads  # noqa: E402

from tl_backward import capture, metrics  # noqa: E402
from tl_backward.core.readout import Unembed  # noqa: E402
from tl_backward.report import build_report  # noqa: E402
from tl_backward.zoo.tiny import TINY_WORDS  # noqa: E402

TIME_TARGET, MAX_FORWARDS, MAX_BACKWARDS = 1.3, 2, 1
TARGET = " cat"


def prompt_of(n_tokens: int) -> str:
    """``n_tokens`` tokens including BOS: plain words of the tiny vocabulary, cycled."""
    words = [w for w in TINY_WORDS if w.isalpha()]
    return " ".join(words[i % len(words)] for i in range(n_tokens - 1))


@contextlib.contextmanager
def counted(model: Any) -> Iterator[dict[str, int]]:
    """Count forwards (embedding calls) and backwards (autograd.grad / Tensor.backward calls)."""
    counts = {"forward": 0, "backward": 0}
    grad, backward = torch.autograd.grad, torch.Tensor.backward

    def counting_grad(*args: Any, **kwargs: Any):
        counts["backward"] += 1
        return grad(*args, **kwargs)

    def counting_backward(self: torch.Tensor, *args: Any, **kwargs: Any):
        counts["backward"] += 1
        return backward(self, *args, **kwargs)

    def on_forward(module: Any, args: Any) -> None:
        counts["forward"] += 1

    handle = model.embed.register_forward_pre_hook(on_forward)
    torch.autograd.grad, torch.Tensor.backward = counting_grad, counting_backward
    try:
        yield counts
    finally:
        torch.autograd.grad, torch.Tensor.backward = grad, backward
        handle.remove()


def recorded_readouts(model: Any, prompt: str) -> list[tuple[Unembed, tuple, dict]]:
    """Every ``Unembed.readout`` call one ``build_report`` makes, with its arguments."""
    calls: list[tuple[Unembed, tuple, dict]] = []
    real = Unembed.readout

    def spy(self: Unembed, *args: Any, **kwargs: Any):
        calls.append((self, args, kwargs))
        return real(self, *args, **kwargs)

    Unembed.readout = spy
    try:
        build_report(model, prompt, target=TARGET)
    finally:
        Unembed.readout = real
    return calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    model = gpt2_small_random()
    prompt = prompt_of(args.tokens)
    n = model.to_tokens(prompt).shape[1]
    print(f"GPT-2-small shape, 1 x {n} tokens, {threads} threads, target {TARGET!r}")

    with counted(model) as passes:
        build_report(model, prompt, target=TARGET)
    ok_passes = passes["forward"] <= MAX_FORWARDS and passes["backward"] <= MAX_BACKWARDS
    print(f"(a) build_report ran {passes['forward']} forward(s) and {passes['backward']} backward(s)  "
          f"(target <= {MAX_FORWARDS} / {MAX_BACKWARDS}: {'ok' if ok_passes else 'MISS'})")

    calls = recorded_readouts(model, prompt)
    rows = sum(int(args_[0].shape[0]) for _, args_, _ in calls)

    def floor() -> None:
        capture(model, prompt, metrics.target_nll(TARGET))
        for unembed, args_, kwargs in calls:
            unembed.readout(*args_, **kwargs)

    med = interleaved_medians({
        "report": lambda: build_report(model, prompt, target=TARGET),
        "capture": lambda: capture(model, prompt, metrics.target_nll(TARGET)),
        "floor": floor,
    }, repeats=args.repeats)
    ratio = med["report"] / med["capture"]
    print(f"    report {med['report']:.2f} s, capture {med['capture']:.2f} s, capture + the report's "
          f"{len(calls)} vocabulary readouts ({rows} vectors) {med['floor']:.2f} s (medians of {args.repeats}, "
          "interleaved)")
    print("(b) " + ratio_line("build_report / capture", med["report"], med["capture"], TIME_TARGET))
    print("(c) " + ratio_line("build_report / (capture + readouts)", med["report"], med["floor"], TIME_TARGET))
    return 0 if ok_passes and ratio <= TIME_TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
