"""GPU check: every analysis on a model split over two devices (or on one GPU) equals the same on the CPU.

Run on a GPU machine, from the repository root: ``python benchmarks/gpu_check.py``.

* two or more CUDA devices: the embedded model's blocks are dispatched over ``cuda:0`` / ``cuda:1``
  (``load_model(device_map=...)``: embeddings and the first half of the blocks on the first device,
  the rest and the final norm on the second; a tied unembedding stays with the embedding, so the
  readout crosses devices too);
* one CUDA device: the whole model on ``cuda:0``;
* no CUDA: prints ``skipped: no CUDA`` and exits 0 (CI machines).

``--devices cpu,cpu`` runs the split code path with both halves on the CPU (no second device: it
checks this script and the device-map plumbing, not cross-device transfers); ``--devices cuda:0``
or ``cuda:0,cuda:1`` choose explicitly. ``--split n_devices`` dispatches with TransformerLens's own
``TransformerBridge.boot_transformers(path, n_devices=2)`` (Accelerate's "balanced" map over the
visible GPUs) instead of the explicit map; it needs two CUDA devices.

Compared against the CPU run of the same fp32 weights, same prompts: ``capture`` (every hook
point's activation and gradient, metric, last logits), ``reversed_attention`` (maps, patterns and
``keep="norms"``), ``patch_attention`` (the patched metric), ``gradient_factors`` (every module,
dense reconstruction), ``backward_lens`` (norms, top/bottom logits, token ids), ``flow_graph``
(forward and backward, a layer on the second device: node values, norms, vectors, edge weights),
MAS (``segment_mask`` logits, ``mas_generate`` greedy tokens). Each result must also sit on one
device (:func:`tl_backward.core.device.result_device`).

Tolerance (tests/tolerance.py): CUDA and CPU kernels differ in accumulation order only (TF32 is
switched off here), so ``|a − b| ≤ rtol·(max|b| + |b|)`` with ``rtol = 8·eps·sqrt(n_terms)``,
``n_terms = d_vocab + 2·(d_model + d_mlp + positions + d_head)`` -- about 4e-5 for facts-gpt2.
Token ids must match except where the two runs' logits tie to within that bound. Exit status 0 when
every check passes.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import tl_backward as tlb  # noqa: E402
from tests.tolerance import fp32_rtol  # noqa: E402
from tl_backward import zoo  # noqa: E402
from tl_backward.core.compat import TransformerBridge  # noqa: E402
from tl_backward.core.device import input_device, model_devices, module_device, result_device  # noqa: E402

PROMPTS = ["the capital of france is", "the capital of italy is"]
TARGETS = [" paris", " rome"]
MAS_PROMPT = ("system : read the context and answer the question . ### user : context : gina lives in moscow . "
              "karen lives in delhi . question : where does karen live ? ### answer :")


# ------------------------------------------------------------------------------ devices and models
def choose_devices(spec: str) -> list[str] | None:
    """The devices to compare against the CPU, or None when there is nothing to run on."""
    if spec != "auto":
        return [d.strip() for d in spec.split(",") if d.strip()]
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        return None
    return ["cuda:0", "cuda:1"] if n >= 2 else ["cuda:0"]


def split_map(name: str, devices: list[str]) -> dict[str, str]:
    """HF device map of ``name``: embeddings and blocks ``[0, n/2)`` on ``devices[0]``, the other
    blocks and the final norm on ``devices[1]``; the unembedding on ``devices[1]`` unless tied to the
    embedding (then with it). Module names from the model built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(zoo.model_dir(name), local_files_only=True)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config)
    n = int(config.num_hidden_layers)
    blocks = next(p for p, m in hf.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n)
    first, second = devices[0], devices[-1]
    out = {f"{blocks}.{i}": first if i < (n + 1) // 2 else second for i in range(n)}
    embed = hf.get_input_embeddings()
    parent = blocks.rsplit(".", 1)[0]
    for child, module in hf.get_submodule(parent).named_children():
        if f"{parent}.{child}" != blocks:  # embeddings (token, position) first, the final norm last
            out[f"{parent}.{child}"] = first if isinstance(module, torch.nn.Embedding) or module is embed else second
    tied = hf.get_output_embeddings().weight is embed.weight
    for child, _ in hf.named_children():
        if child != parent:
            out[child] = first if tied else second
    return out


def candidate(name: str, devices: list[str], split: str = "map") -> Any:
    if len(devices) == 1:
        return tlb.load_model(name, device=devices[0])
    if split == "n_devices":
        path = str(zoo.model_dir(name))
        return TransformerBridge.boot_transformers(path, n_devices=len(devices), dtype=torch.float32).eval()
    return tlb.load_model(name, device_map=split_map(name, devices))


# ------------------------------------------------------------------------------ comparisons
class Checks:
    """Collects comparisons: ``|a − b| ≤ rtol·(max|b| + |b|)`` (module docstring)."""

    def __init__(self, rtol: float):
        self.rtol, self.rows, self.failed = rtol, [], 0

    def close(self, what: str, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        if a.shape != b.shape:
            return self.fail(what, f"shapes {tuple(a.shape)} vs {tuple(b.shape)}")
        both_nan = torch.isnan(a) & torch.isnan(b)
        a, b = a.masked_fill(both_nan, 0), b.masked_fill(both_nan, 0)
        scale = float(b.abs().max()) if b.numel() else 0.0
        excess = (a - b).abs() - self.rtol * b.abs()
        err = float(excess.max()) if b.numel() else 0.0
        bound = self.rtol * scale
        ok = math.isfinite(err) and err <= bound
        self.record(ok, what, f"max|Δ| − rtol·|b| = {max(err, 0.0):.2e} (bound {bound:.2e})")

    def ids(self, what: str, a_ids: torch.Tensor, b_ids: torch.Tensor, a_vals: torch.Tensor,
            b_vals: torch.Tensor) -> None:
        """Token ids equal, except at ties: where they differ the two runs' values must agree."""
        a_ids, b_ids = a_ids.cpu(), b_ids.cpu()
        differ = a_ids != b_ids
        tied = (a_vals.cpu().double() - b_vals.cpu().double()).abs() <= self.rtol * (float(b_vals.abs().max()) + 1e-30)
        bad = int((differ & ~tied).sum())
        self.record(bad == 0, what, f"{int(differ.sum())} of {differ.numel()} ids differ, {bad} not at a tie")

    def equal(self, what: str, a: Any, b: Any) -> None:
        self.record(a == b, what, "equal" if a == b else f"{a!r:.60} vs {b!r:.60}")

    def fail(self, what: str, why: str) -> None:
        self.record(False, what, why)

    def record(self, ok: bool, what: str, detail: str) -> None:
        self.failed += not ok
        self.rows.append(f"{'ok  ' if ok else 'FAIL'}  {what:<44} {detail}")
        print(self.rows[-1], flush=True)


def on_one_device(c: Checks, what: str, model: Any, *tensors: torch.Tensor) -> None:
    want = result_device(model)
    where = {str(t.device) for t in tensors}
    c.record(where == {str(want)}, f"{what}: result device", f"{sorted(where)} (want {want})")


def check_capture(c: Checks, cand: Any, ref: Any) -> None:
    metric = tlb.metrics.target_nll(TARGETS)
    a, b = tlb.capture(cand, PROMPTS, metric), tlb.capture(ref, PROMPTS, metric)
    c.equal("capture: hook names", list(a.keys()), list(b.keys()))
    c.close("capture: metric", a.metric, b.metric)
    c.close("capture: last logits", a.last_logits, b.last_logits)
    worst_act = max(a.keys(), key=lambda n: _excess(a[n], b[n]))
    worst_grad = max(a.gradients, key=lambda n: _excess(a.gradients[n], b.gradients[n]))
    c.close(f"capture: activations (worst {worst_act})", a[worst_act], b[worst_act])
    c.close(f"capture: gradients (worst {worst_grad})", a.gradients[worst_grad], b.gradients[worst_grad])
    c.close("capture: resid_grads('pre') stack", a.resid_grads("pre"), b.resid_grads("pre"))
    on_one_device(c, "capture.resid_grads", cand, a.resid_grads("pre"))


def _excess(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a − b| relative to max|b| (which hook point to report as the worst)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float(((a - b).abs().nan_to_num(0)).max() / (b.abs().nan_to_num(0).max() + 1e-30))


def check_attention(c: Checks, cand: Any, ref: Any) -> None:
    a, b = tlb.reversed_attention(cand, PROMPTS, TARGETS), tlb.reversed_attention(ref, PROMPTS, TARGETS)
    c.close("reversed_attention: maps", a.maps, b.maps)
    c.close("reversed_attention: patterns", a.patterns, b.patterns)
    on_one_device(c, "reversed_attention", cand, a.maps, a.patterns)
    an, bn = (tlb.reversed_attention(m, PROMPTS, TARGETS, keep="norms") for m in (cand, ref))
    c.close("reversed_attention(keep='norms')", an.reversed_norms, bn.reversed_norms)
    on_one_device(c, "reversed_attention(keep='norms')", cand, an.reversed_norms, an.forward_norms)
    last = cand.cfg.n_layers - 1
    metrics = []
    for model, ra in ((cand, a), (ref, b)):
        with tlb.patch_attention(model, ra, eta=0.1, layers=[0, last]):
            metrics.append(tlb.capture(model, PROMPTS, tlb.metrics.target_nll(TARGETS), names="hook_embed").metric)
    c.close("patch_attention: patched metric", *metrics)


def check_lens(c: Checks, cand: Any, ref: Any) -> None:
    a, b = (tlb.gradient_factors(m, PROMPTS, TARGETS, modules="all") for m in (cand, ref))
    worst = max(b.factors, key=lambda k: _excess(a.factors[k].reconstruct(), b.factors[k].reconstruct()))
    c.close(f"gradient_factors: reconstruct (worst {worst})", a.factors[worst].reconstruct(),
            b.factors[worst].reconstruct())
    homes = {(l, m): str(f.x.device) for (l, m), f in a.factors.items()}
    blocks = {l: str(module_device(cand.blocks[l])) for l in range(cand.cfg.n_layers)}
    stray = [k for k, d in homes.items() if d != blocks[k[0]]]
    c.record(not stray, "gradient_factors: each on its layer's device", f"{len(stray)} elsewhere {stray[:2]}")
    la, lb = (tlb.backward_lens(m, PROMPTS, TARGETS, modules=("mlp_in", "mlp_out")) for m in (cand, ref))
    for mod in ("mlp_in", "mlp_out"):
        ra_, rb = la.readouts[mod], lb.readouts[mod]
        c.close(f"backward_lens[{mod}]: norms", ra_.norm, rb.norm)
        c.close(f"backward_lens[{mod}]: top logits", ra_.top_logits, rb.top_logits)
        c.close(f"backward_lens[{mod}]: bottom logits", ra_.bottom_logits, rb.bottom_logits)
        c.ids(f"backward_lens[{mod}]: top ids", ra_.top_ids, rb.top_ids, ra_.top_logits, rb.top_logits)
        c.ids(f"backward_lens[{mod}]: bottom ids", ra_.bottom_ids, rb.bottom_ids, ra_.bottom_logits, rb.bottom_logits)


def check_flow(c: Checks, cand: Any, ref: Any) -> None:
    layer = cand.cfg.n_layers - 1  # on the second device of a split
    for backward in (False, True):
        kind = "backward" if backward else "forward"
        ga, gb = (tlb.flow_graph(m, PROMPTS[0], layer=layer, target=TARGETS[0], backward=backward) for m in (cand, ref))
        c.equal(f"flow_graph({kind}): node ids", [n.id for n in ga.nodes], [n.id for n in gb.nodes])
        if [n.id for n in ga.nodes] != [n.id for n in gb.nodes]:
            continue
        c.close(f"flow_graph({kind}): node values", torch.tensor([n.value for n in ga.nodes]),
                torch.tensor([n.value for n in gb.nodes]))
        c.close(f"flow_graph({kind}): node norms", torch.tensor([n.norm for n in ga.nodes]),
                torch.tensor([n.norm for n in gb.nodes]))
        vecs = [(n.vector, m.vector) for n, m in zip(ga.nodes, gb.nodes) if n.vector is not None]
        if vecs:
            c.close(f"flow_graph({kind}): node vectors", torch.stack([v for v, _ in vecs]),
                    torch.stack([w for _, w in vecs]))
        ea = {(e.source, e.target, e.kind): e.weight for e in ga.edges}
        eb = {(e.source, e.target, e.kind): e.weight for e in gb.edges}
        c.equal(f"flow_graph({kind}): edges", sorted(ea), sorted(eb))
        if sorted(ea) == sorted(eb):
            c.close(f"flow_graph({kind}): edge weights", torch.tensor([ea[k] for k in eb]),
                    torch.tensor(list(eb.values())))


def check_mas(c: Checks, cand: Any, ref: Any) -> None:
    logits = []
    for model in (cand, ref):
        seg = tlb.segments.from_delimiter(model, [MAS_PROMPT, MAS_PROMPT.replace("karen", "gina", 1)])
        with torch.no_grad(), tlb.segment_mask(model, seg):
            out = model(seg.tokens.to(input_device(model)), return_type="logits")
        logits.append(out.cpu()[seg.valid.cpu()])  # real tokens only (padding rows are not compared)
    c.close("segment_mask: MAS logits", *logits)
    gens = [tlb.mas_generate(m, tlb.segments.from_delimiter(m, MAS_PROMPT), max_new_tokens=4).new_tokens
            for m in (cand, ref)]
    c.equal("mas_generate: greedy tokens", gens[0].tolist(), gens[1].tolist())


STEPS: tuple[Callable[[Checks, Any, Any], None], ...] = (check_capture, check_attention, check_lens, check_flow,
                                                          check_mas)


def run(name: str, devices: list[str], split: str = "map") -> int:
    ref, cand = tlb.load_model(name, device="cpu"), candidate(name, devices, split)
    placed = [str(d) for d in model_devices(cand)]
    blocks = [str(module_device(b)) for b in cand.blocks]
    print(f"{name}: parameters on {placed}; blocks on {blocks}; inputs on {input_device(cand)}; TransformerLens "
          f"cfg.device {cand.cfg.device}, cfg.n_devices {getattr(cand.cfg, 'n_devices', 1)}", flush=True)
    cfg = cand.cfg
    n_terms = cfg.d_vocab + 2 * (cfg.d_model + cfg.d_mlp + 64 + cfg.d_head)
    checks = Checks(fp32_rtol(n_terms))
    if split == "map":
        checks.equal("model: blocks on the requested devices", blocks,
                     [devices[0] if len(devices) == 1 or i < (len(blocks) + 1) // 2 else devices[-1]
                      for i in range(len(blocks))])
    else:
        checks.equal("model: blocks on several devices", len(set(blocks)) > 1, True)
    for step in STEPS:
        try:
            step(checks, cand, ref)
        except Exception as err:  # a crash is a failed check: report it and go on
            checks.fail(step.__name__, f"{type(err).__name__}: {str(err).splitlines()[0][:120]}")
    print(f"{name}: {len(checks.rows) - checks.failed} of {len(checks.rows)} checks passed", flush=True)
    return checks.failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="auto",
                        help="'auto' (default), or a comma list such as cuda:0,cuda:1 / cuda:0 / cpu,cpu")
    parser.add_argument("--model", default="all", help=f"an embedded model {zoo.list_models()} or 'all'")
    parser.add_argument("--split", default="map", choices=("map", "n_devices"),
                        help="two devices: tl_backward's explicit device map (default) or TransformerLens's n_devices")
    args = parser.parse_args(argv)
    devices = choose_devices(args.devices)
    if devices is None:
        print("skipped: no CUDA")
        return 0
    if args.split == "n_devices" and (len(devices) < 2 or not all(d.startswith("cuda") for d in devices)):
        parser.error("--split n_devices needs two CUDA devices (TransformerLens splits over GPUs only)")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both sides
    torch.backends.cudnn.allow_tf32 = False
    names = zoo.list_models() if args.model == "all" else [args.model]
    print(f"comparing {names} on {devices} against the CPU", flush=True)
    failed = sum(run(name, devices, args.split) for name in names)
    print("all checks passed" if not failed else f"FAILED: {failed} checks")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
