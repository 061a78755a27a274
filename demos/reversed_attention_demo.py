"""Reversed Attention on the embedded model: the rendered example page and the paper's two
experiments (ICL attention patching, head perturbation) on every ICL task of the synthetic world.

Writes
* ``demos/reversed_attention_example.html`` -- ``ReversedAttention.render()`` of a 3-shot antonym
  prompt (norm heatmaps, the top heads' RA maps on a signed scale beside their forward patterns);
* ``demos/reversed_attention_results.md`` -- the tables; ``demos/reversed_attention_results.json``
  -- every row (both experiments, every task, seed, n_shots, η / kept fraction).

Protocol (spec reversed_attention.md §3, §5, on ``facts-gpt2``): the paper's template and η grid,
n_shots ∈ {0, 1, 5, 10}, RĀ and P̄ means over up to 25 fit prompts, RA vs forward-map control vs no
patch, top-1/2/3 of the answer's first token. World test splits are small (12-22 queries per task),
so everything is repeated over ``--seeds`` demonstration draws (a fresh RĀ each) and averaged.
Two fits (see :func:`patching_plan`): the paper's (first 25 *training* queries; facts-gpt2 has
memorised those pairs, so their loss and RA are near 0) and a held-out one (2-fold over the test
pairs). η* per (task, n_shots, method) is chosen on selection queries, never on the scored ones.
Perturbation: heads ranked on the first 25 training queries (paper protocol), scored on test.

    python demos/reversed_attention_demo.py [--seeds 3] [--tasks antonym ...] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import tl_backward as tlb  # noqa: E402
from tl_backward.attention import reversed_attention  # noqa: E402
from tl_backward.attention.icl import PAPER_ETAS, PAPER_SHOTS, icl_patching, world_pairs  # noqa: E402
from tl_backward.attention.perturbation import icl_perturbation  # noqa: E402
from tl_backward.zoo.world import ICL_TASKS, World  # noqa: E402

OUT = ROOT / "demos"
N_TRAIN = 25


def example_page(model):
    prompt, target, _ = World(0).icl_examples("antonym", 3, "test", seed=0)[0]
    ra = reversed_attention(model, prompt, target, prepend_bos=True)
    title = f"Reversed Attention on facts-gpt2: 3-shot antonym prompt, target {target!r}"
    path = ra.render(k=8, title=title).save(OUT / "reversed_attention_example.html")
    print(f"wrote {path.relative_to(ROOT)}: {ra!r}; top heads "
          + ", ".join(f"L{l}H{h} {v:.3g}" for l, h, v in ra.top_heads(5)))
    return {"prompt": prompt, "target": target, "metric": float(ra.metric),
            "top_heads": [[l, h, v] for l, h, v in ra.top_heads(16)]}


def mean(xs):
    return statistics.fmean(xs) if xs else float("nan")


def patching_plan(task):
    """(variant, fold, fit queries, selection queries, evaluation queries) of one task.

    ``paper``: RĀ over the first 25 training queries, η selected on those queries (fresh
    demonstrations), scored on the test split -- the paper's protocol. facts-gpt2 was trained on
    its training pairs, so their loss (and RA) is near 0 there. ``heldout``: 2-fold over the test
    pairs -- RĀ over one half (η selected on it), scored on the other half, then the roles swap."""
    train, test = world_pairs(task)
    halves = (test[0::2], test[1::2])
    yield "paper", 0, train[:N_TRAIN], train[:N_TRAIN], test
    for fold in (0, 1):
        yield "heldout", fold, halves[fold], halves[fold], halves[1 - fold]


def run_patching(model, tasks, seeds):
    rows = []
    for task in tasks:
        train, _ = world_pairs(task)
        for seed in seeds:
            for variant, fold, fitq, selq, evalq in patching_plan(task):
                for split, queries in (("select", selq), ("test", evalq)):
                    res = icl_patching(model, train, queries, n_train=N_TRAIN, fit_queries=fitq, seed=seed,
                                       verbose=False)
                    rows += [{**r.to_dict(), "task": task, "seed": seed, "variant": variant, "fold": fold,
                              "split": split, "fit_loss": res.fit_loss[r.n_shots]} for r in res.rows]
        print(f"  patching {task}: done", flush=True)
    return rows


def patching_summary(rows, tasks, variant):
    """Per (task, shots): no-patch test top-1; for RA and control, η* (best top-1 on the selection
    queries, mean over seeds and folds; ties -> smallest |η|; 0 if no η beats no patch there) and its
    test top-1/2/3 and NLL (mean over seeds and folds)."""
    acc = defaultdict(list)
    for r in rows:
        if r["variant"] == variant:
            acc[(r["task"], r["n_shots"], r["method"], r["eta"], r["split"])].append(r)
    top1 = lambda key: mean([r["top1"] for r in acc[key]])  # noqa: E731
    out = []
    for task in tasks:
        for k in PAPER_SHOTS:
            none = acc[(task, k, "none", 0.0, "test")]
            line = {"task": task, "n_shots": k, "none_top1": mean([r["top1"] for r in none]),
                    "none_nll": mean([r["nll"] for r in none]), "fit_loss": mean([r["fit_loss"] for r in none])}
            for method in ("reversed", "forward"):
                etas = sorted({e for (t, s, m, e, sp) in acc if (t, s, m, sp) == (task, k, method, "select")})
                best = max(etas, key=lambda e: (top1((task, k, method, e, "select")), -abs(e)))
                if top1((task, k, method, best, "select")) <= top1((task, k, "none", 0.0, "select")):
                    best = 0.0
                test = acc[(task, k, method, best, "test")] or none
                line[method] = {"eta": best, **{m: mean([r[m] for r in test]) for m in ("top1", "top2", "top3", "nll")}}
            out.append(line)
    return out


def summary_table(summary):
    md = ["| task | shots | fit loss | no patch top-1 (NLL) | RA patch: η*, top-1 (NLL) | control: η*, top-1 (NLL) |",
          "|---|---|---|---|---|---|"]
    for s in summary:
        ra, fw = s["reversed"], s["forward"]
        md.append(f"| {s['task']} | {s['n_shots']} | {s['fit_loss']:.3f} | {s['none_top1']:.1f} ({s['none_nll']:.3f}) "
                  f"| {ra['eta']:g}: {ra['top1']:.1f} ({ra['nll']:.3f}) | {fw['eta']:g}: {fw['top1']:.1f} ({fw['nll']:.3f}) |")
    by_k = lambda k, key: mean([(s[key]["top1"] if key != "none" else s["none_top1"])  # noqa: E731
                                for s in summary if s["n_shots"] == k])
    nll_k = lambda k, key: mean([(s[key]["nll"] if key != "none" else s["none_nll"])  # noqa: E731
                                 for s in summary if s["n_shots"] == k])
    md += ["", "Mean over tasks, test top-1 % (mean answer NLL), η* per task:", "",
           "| shots | no patch | RA patch | control |", "|---|---|---|---|"]
    md += [f"| {k} | {by_k(k, 'none'):.1f} ({nll_k(k, 'none'):.3f}) | {by_k(k, 'reversed'):.1f} "
           f"({nll_k(k, 'reversed'):.3f}) | {by_k(k, 'forward'):.1f} ({nll_k(k, 'forward'):.3f}) |" for k in PAPER_SHOTS]
    return md


def grid_table(rows, method, variant):
    """Test top-1 (%) per η (rows) and n_shots (columns), mean over tasks, seeds and folds."""
    rows = [r for r in rows if r["variant"] == variant]
    lines = [f"| η | " + " | ".join(f"{k}-shot" for k in PAPER_SHOTS) + " |", "|---" * (len(PAPER_SHOTS) + 1) + "|"]
    cell = lambda k, m, e: mean([r["top1"] for r in rows if r["split"] == "test" and r["n_shots"] == k  # noqa: E731
                                 and r["method"] == m and r["eta"] == e])
    lines.append("| 0 (no patch) | " + " | ".join(f"{cell(k, 'none', 0.0):.1f}" for k in PAPER_SHOTS) + " |")
    for eta in PAPER_ETAS:
        if eta != 0:
            lines.append(f"| {eta:g} | " + " | ".join(f"{cell(k, method, float(eta)):.1f}" for k in PAPER_SHOTS) + " |")
    return "\n".join(lines)


def run_perturbation(model, tasks, seeds):
    rows = []
    for task in tasks:
        train, test = world_pairs(task)
        for seed in seeds:
            res = icl_perturbation(model, train, test, n_train=N_TRAIN, seed=seed, verbose=False)
            for k, run in res.items():
                rows += [{**row.to_dict(), "task": task, "seed": seed, "n_shots": k} for row in run.rows]
        print(f"  perturbation {task}: done")
    return rows


def perturbation_table(rows, k):
    names = list(dict.fromkeys(r["ranking"] for r in rows))
    fractions = list(dict.fromkeys(r["fraction"] for r in rows))
    lines = ["| kept | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for f in fractions:
        cells = [mean([r["top1"] for r in rows if r["n_shots"] == k and r["ranking"] == n and r["fraction"] == f])
                 for n in names]
        lines.append(f"| {f:.0%} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    return "\n".join(lines)


def area(rows, k, name):
    """Mean top-1 over the kept fractions (area under the accuracy-vs-kept curve, in %)."""
    return mean([r["top1"] for r in rows if r["n_shots"] == k and r["ranking"] == name])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--tasks", nargs="+", default=list(ICL_TASKS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--from-json", action="store_true",
                    help="rewrite the Markdown from demos/reversed_attention_results.json without rerunning")
    args = ap.parse_args()
    if args.from_json:
        data = json.loads((OUT / "reversed_attention_results.json").read_text(encoding="utf-8"))
    else:
        torch.set_num_threads(args.threads)
        seeds = list(range(args.seeds))
        model = tlb.load_model()
        start = time.perf_counter()
        example = example_page(model)
        print("ICL attention patching ...")
        patch_rows = run_patching(model, args.tasks, seeds)
        t_patch = time.perf_counter() - start
        print("head perturbation ...")
        pert_rows = run_perturbation(model, args.tasks, seeds)
        elapsed = time.perf_counter() - start
        data = {"model": "facts-gpt2", "seeds": seeds, "tasks": args.tasks, "n_train": N_TRAIN,
                "etas": list(PAPER_ETAS), "threads": args.threads, "example": example,
                "patching_summary": {v: patching_summary(patch_rows, args.tasks, v) for v in ("paper", "heldout")},
                "patching_rows": aggregate(patch_rows, ("variant", "task", "n_shots", "method", "eta", "split")),
                "perturbation_rows": aggregate(pert_rows, ("task", "n_shots", "ranking", "fraction")),
                "elapsed_s": elapsed, "patching_s": t_patch}
        (OUT / "reversed_attention_results.json").write_text(json.dumps(data), encoding="utf-8")
    text = markdown(data)
    (OUT / "reversed_attention_results.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote demos/reversed_attention_results.md/.json ({data['elapsed_s'] / 60:.1f} min)")


def aggregate(rows, keys):
    """Rows averaged over seeds (and folds): one row per ``keys`` value with the mean of every
    numeric field and ``n`` = rows averaged. Every task has the same number of seeds and folds, so
    means over tasks of these rows equal means over all raw rows."""
    groups = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in keys)].append(r)
    out = []
    for key, rs in groups.items():
        row = dict(zip(keys, key))
        for f in rs[0]:
            if f not in row and f not in ("seed", "fold") and isinstance(rs[0][f], (int, float)):
                row[f] = round(mean([r[f] for r in rs]), 6)
        out.append({**row, "n": len(rs)})
    return out


def markdown(data: dict) -> str:
    tasks, summaries = data["tasks"], data["patching_summary"]
    patch_rows, pert_rows = data["patching_rows"], data["perturbation_rows"]
    n_seeds, elapsed, t_patch = len(data["seeds"]), data["elapsed_s"], data["patching_s"]
    sizes = {t: [len(x) for x in world_pairs(t)] for t in tasks}
    threads = data.get("threads", 1)

    md = ["# Reversed Attention on facts-gpt2: ICL patching and head perturbation",
          "", f"Generated by `python demos/reversed_attention_demo.py --seeds {n_seeds}` "
          f"({elapsed / 60:.1f} min on {threads} CPU thread(s); patching {t_patch / 60:.1f} min). "
          "Every row is in `reversed_attention_results.json`.",
          "", "Model: facts-gpt2 (4 layers x 4 heads = 16 heads, word-level vocabulary). Tasks (train/test pairs): "
          + ", ".join(f"{t} {a}/{b}" for t, (a, b) in sizes.items()) + ".",
          f"Template `Q: x\\nA: y\\n\\n` x n + `Q: x\\nA:`, n_shots in {list(PAPER_SHOTS)}, the paper's 24-value "
          f"η grid; RĀ and P̄ are means over up to {N_TRAIN} fit prompts (loss: NLL of the answer's first token). "
          f"{n_seeds} seeds (demonstration draws, a fresh RĀ each); figures are means over seeds (and folds).",
          "", "## ICL attention patching: P' = P + η·RĀ vs the control P' = P + η·P̄ (every head, no renormalisation)",
          "", "η* = the grid value with the best top-1 on the *selection* queries (0 if none beats no patch); "
          "cells give that η's top-1 (%) and mean answer NLL (nats) on the *evaluation* queries. "
          "`fit loss` = mean loss of the prompts RĀ was averaged over.",
          "", "### Paper protocol: RĀ over the first 25 training queries, η* selected on them, scored on the test split",
          "", "facts-gpt2 was trained on documents built from its training pairs: with demonstrations their "
          "loss (column `fit loss`) is <= 0.002, so RĀ is ~0: no η of the grid beats no patch on the "
          "selection queries (η* = 0) and test top-1 moves by at most ~1 point anywhere on the grid. At 0 shots the fit loss is 0.4-1.0 (antonym: 0.004) and RA patching "
          "does move predictions.", ""]
    md += summary_table(summaries["paper"])
    md += ["", "### Held-out fit: 2-fold over the test pairs (RĀ over one half, η* selected on that half, "
           "scored on the other half; then swapped)", ""]
    md += summary_table(summaries["heldout"])
    for variant, vlabel in (("heldout", "held-out fit"), ("paper", "paper protocol")):
        for method, label in (("reversed", "RA patching"), ("forward", "forward-map control")):
            md += ["", f"### Full η grid, {label}, {vlabel}: evaluation top-1 (%), mean over tasks, seeds, folds", "",
                   grid_table(patch_rows, method, variant)]
    md += ["", "## Head perturbation (keep the top fraction of the 16 heads by a ranking, zero the others' hook_z)",
           "", "Rankings from `rank_heads` on the 25 training prompts: `reversed` = mean ‖RA‖_F, `forward` = mean ‖P‖_F, "
           "`random` = seeded shuffle; `_asc` = the same ranking reversed (least important first). Test top-1 (%), "
           "mean over tasks and seeds.", ""]
    md += ["| shots | " + " | ".join(dict.fromkeys(r["ranking"] for r in pert_rows)) + " |",
           "|---" * (1 + len(set(r["ranking"] for r in pert_rows))) + "|"]
    for k in PAPER_SHOTS:
        md.append(f"| {k} (mean over kept fractions) | " + " | ".join(
            f"{area(pert_rows, k, n):.1f}" for n in dict.fromkeys(r["ranking"] for r in pert_rows)) + " |")
    for k in PAPER_SHOTS:
        md += ["", f"### {k}-shot: test top-1 (%) vs kept fraction", "", perturbation_table(pert_rows, k)]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
