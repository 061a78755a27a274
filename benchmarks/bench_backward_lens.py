"""Backward Lens cost: gradient factors vs dense weight gradients, and the vocabulary projection.

GPT-2-small-shaped random bridge (12 layers, d_model 768, 12 heads, d_mlp 3072, vocabulary
50,257), one prompt of 32 random tokens, loss = the target's NLL at the last position.

(a) ``gradient_factors(..., modules="all")`` -- factors of all 6 x 12 = 72 weight matrices
    (W_in, W_out, W_Q/W_K/W_V/W_O per head) from one forward + backward -- against a plain
    forward + ``loss.backward()`` that writes dense weight gradients (benchmarks/_common.py
    ``plain_backward``). Targets: time ratio <= 1.0; factor memory <= 5 % of the dense gradients.
    Also shown: the activation-gradient floor (frozen weights, no hooks) and the factor memory
    against the dense gradients of the *same 72 matrices* only (the rank-n bound
    n (d_in + d_out) / (d_in d_out) is 5.2 % for a 768 x 3072 matrix at n = 32).
(b) ``project_factors``: every distinct d_model-sized factor of (a) -- x of W_in, x of W_Q/K/V
    (shared), δ of W_out, δ of W_O: 4 x 12 x 32 = 1536 vectors -- through ln_final and the 50,257
    x 768 unembedding with top-5, bottom-5 and two ranks per vector. Achieved GFLOP/s
    (2 · rows · d_model · vocab per call) against one ``torch.matmul`` of the same shape timed in
    the same run, interleaved. Target >= 50 %.

Run: ``python benchmarks/bench_backward_lens.py [--repeats N] [--threads T]``. Exit code 1 if a
target is missed. Timings on a shared 2-core machine are noisy: medians of interleaved runs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _common import (MEMORY_METHOD, activation_grads_only, gpt2_small_random, interleaved_medians,  # noqa: E402
                     last_token_nll, peak_memory, plain_backward, random_tokens, set_threads)

from tl_backward.core.adapter import get_adapter  # noqa: E402
from tl_backward.lens import backward_lens, gradient_factors  # noqa: E402
from tl_backward.lens.backward_lens import project_factors  # noqa: E402

TIME_TARGET, MEMORY_TARGET, GFLOPS_TARGET = 1.0, 0.05, 0.50
MIB = 1024 ** 2


def dense_grad_bytes(model, tokens: torch.Tensor, target: int) -> int:
    """Bytes of the parameter gradients one plain ``loss.backward()`` allocates (then freed)."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.grad = None
            p.requires_grad_(True)
        last_token_nll(target)(model(tokens, return_type="logits")).backward()
        return sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    finally:
        for p, f in zip(params, flags):
            p.grad = None
            p.requires_grad_(f)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)

    model = gpt2_small_random()
    ad = get_adapter(model)
    tokens = random_tokens(1, 32, ad.d_vocab)
    target = 1234
    ok = True

    # ------------------------------------------------------------------ (a) factors vs dense grads
    factors = lambda: gradient_factors(model, tokens, target, modules="all")  # noqa: E731
    med = interleaved_medians({"factors": factors, "plain": plain_backward(model, tokens, target),
                               "floor": activation_grads_only(model, tokens, target)}, repeats=args.repeats)
    peak = {"factors": peak_memory(factors, repeats=3),
            "plain": peak_memory(plain_backward(model, tokens, target), repeats=3)}
    gf = factors()
    dense = dense_grad_bytes(model, tokens, target)
    same = gf.dense_nbytes()
    t_ratio = med["factors"] / med["plain"]
    m_ratio = gf.nbytes() / dense
    print(f"GPT-2-small-shaped random model, vocab {ad.d_vocab}, input 1x32, {threads} threads, "
          f"median of {args.repeats} interleaved runs")
    print("(a) gradient_factors(modules='all'): 72 matrices "
          f"({len(gf.layers)} layers x {', '.join(gf.modules)})")
    print(f"    time   factors {med['factors'] * 1e3:8.1f} ms | plain fwd+backward {med['plain'] * 1e3:8.1f} ms"
          f" | activation-grad floor {med['floor'] * 1e3:8.1f} ms")
    print(f"    time ratio factors / plain backward = {t_ratio:.3f}  (target <= {TIME_TARGET:.2f}: "
          f"{'ok' if t_ratio <= TIME_TARGET else 'MISS'})")
    print(f"    memory factors {gf.nbytes() / MIB:.2f} MiB vs dense weight gradients of plain backward "
          f"{dense / MIB:.1f} MiB = {100 * m_ratio:.2f} %  (target <= {100 * MEMORY_TARGET:.0f} %: "
          f"{'ok' if m_ratio <= MEMORY_TARGET else 'MISS'})")
    print(f"    memory factors vs dense gradients of the same 72 matrices ({same / MIB:.1f} MiB) = "
          f"{100 * gf.nbytes() / same:.2f} %")
    print(f"    peak extra memory per call: factors {peak['factors']:.0f} MiB | plain backward "
          f"{peak['plain']:.0f} MiB  [{MEMORY_METHOD}]")
    ok &= t_ratio <= TIME_TARGET and m_ratio <= MEMORY_TARGET

    # ------------------------------------------------------------------ (b) projection GFLOP/s
    tid, pid = torch.tensor([target]), torch.tensor([0])
    project = lambda: project_factors(ad, gf, tid, pid, top_k=5, normalize=False)  # noqa: E731
    readouts = project()
    sides = len({(r.top_ids.untyped_storage().data_ptr(), r.top_ids.storage_offset()) for r in readouts.values()})
    rows = sides * len(gf.layers) * gf.n_tokens
    W_U = ad.W_U
    h = torch.randn(rows, ad.d_model)
    matmul = lambda: torch.matmul(h, W_U)  # noqa: E731
    pm = interleaved_medians({"project": project, "matmul": matmul}, repeats=args.repeats)
    flops = 2 * rows * ad.d_model * ad.d_vocab
    g_proj, g_mm = flops / pm["project"] / 1e9, flops / pm["matmul"] / 1e9
    frac = g_proj / g_mm
    print(f"(b) projection of every factor: {rows} vectors ({sides} distinct d_model-sized factor sides x "
          f"{len(gf.layers)} layers x {gf.n_tokens} tokens) through "
          f"ln_final + W_U [{ad.d_model}x{ad.d_vocab}], top-5 + bottom-5 + 2 ranks")
    print(f"    project_factors {pm['project'] * 1e3:8.1f} ms = {g_proj:6.1f} GFLOP/s | one torch.matmul "
          f"[{rows}x{ad.d_model}]@[{ad.d_model}x{ad.d_vocab}] {pm['matmul'] * 1e3:8.1f} ms = {g_mm:6.1f} GFLOP/s")
    print(f"    achieved fraction = {100 * frac:.1f} %  (target >= {100 * GFLOPS_TARGET:.0f} %: "
          f"{'ok' if frac >= GFLOPS_TARGET else 'MISS'})")
    full = rows * ad.d_vocab * 4
    print(f"    the full [{rows}, {ad.d_vocab}] logits would take {full / MIB:.0f} MiB; peak extra memory of "
          f"the projection {peak_memory(project, repeats=1):.0f} MiB")
    ok &= frac >= GFLOPS_TARGET

    # ------------------------------------------------------------------ end to end (informational)
    e2e = interleaved_medians({"lens": lambda: backward_lens(model, tokens, target, modules="all")},
                              repeats=max(1, args.repeats // 2))
    print(f"end to end backward_lens(modules='all'): {e2e['lens'] * 1e3:.0f} ms")
    if not math.isfinite(t_ratio):  # pragma: no cover
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
