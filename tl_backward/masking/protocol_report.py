"""Tables, JSON and the accuracy-vs-steps plot of the MAS protocol (:mod:`tl_backward.masking.protocol`).

:func:`summarize` reads one group's run records (``runs/<mask>-seed<k>.json``), checks the
pairing (both masks of a seed saw the same batches: equal per-epoch order digests over the epochs
both completed) and writes ``summary.json``, ``table.md`` and ``curve.html``. :func:`collect`
gathers every group's ``summary.json`` under ``out`` into ``mas_protocol.json`` and one markdown
table ``mas_protocol.md``. Accuracies are fractions in the JSON and percentages in the tables;
differences are percentage points.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Sequence

from ..errors import TLBackwardError
from ..render.figures import line_plot
from ..render.page import Page
from .stats import paired_summary

MASKS = ("causal", "mas")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _interval(iv: Sequence[float]) -> str:
    return f"[{100 * iv[0]:+.1f}, {100 * iv[1]:+.1f}]"


def check_pairing(runs: dict[str, dict[int, dict]], seeds: Sequence[int]) -> None:
    """Both masks of every seed trained on the same batches: equal order digests for each epoch
    both completed (a plateau stop may end one run earlier; a partial epoch is not compared)."""
    for seed in seeds:
        a, b = (runs[m][seed]["order_digests"] for m in MASKS)
        full = [[d for d in x if not d.endswith("-partial")] for x in (a, b)]
        k = min(len(full[0]), len(full[1]))
        if full[0][:k] != full[1][:k]:
            raise TLBackwardError(f"seed {seed}: the causal and MAS runs saw different data orders "
                                  f"({a[:2]}... vs {b[:2]}...); re-run the group", argument="runs")


def _load_runs(folder: Path, seeds: Sequence[int]) -> dict[str, dict[int, dict]]:
    runs: dict[str, dict[int, dict]] = {m: {} for m in MASKS}
    for mask in MASKS:
        for seed in seeds:
            path = folder / "runs" / f"{mask}-seed{seed}.json"
            if not path.is_file():
                raise TLBackwardError(f"missing run {path}; run the group's command again (it resumes)",
                                      argument="seeds")
            runs[mask][seed] = json.loads(path.read_text())
    return runs


def summarize(folder: str | Path, seeds: Sequence[int], *, n_boot: int = 10000) -> dict:
    """The group's summary (also written to ``summary.json``, ``table.md`` and ``curve.html``):
    config, base accuracies, per mask the per-seed test accuracies / steps / seconds, and
    ``paired``: :func:`tl_backward.masking.stats.paired_summary` of MAS − causal over ``seeds``."""
    folder = Path(folder)
    runs = _load_runs(folder, seeds)
    check_pairing(runs, seeds)
    base = json.loads((folder / "base.json").read_text())
    cfg = base["config"]
    per = {m: {"test_accuracy": [runs[m][s]["test_accuracy"] for s in seeds],
               "steps": [runs[m][s]["steps"] for s in seeds],
               "seconds": [runs[m][s]["seconds"] for s in seeds],
               "stopped_early": [runs[m][s]["stopped_early"] for s in seeds]} for m in MASKS}
    paired = paired_summary(per["mas"]["test_accuracy"], per["causal"]["test_accuracy"], n_boot=n_boot)
    summary = {"group": folder.name, "config": cfg, "seeds": list(seeds),
               "base_test_accuracy": base["test_accuracy"], "arms": per, "paired": paired}
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    (folder / "table.md").write_text(group_table(summary) + "\n")
    curve_page(runs, seeds, title=folder.name).save(folder / "curve.html")
    return summary


def _recipe(cfg: dict) -> str:
    if cfg["lora"]:
        lo = cfg["lora"]
        how = (f"LoRA r {lo['r']}, α {lo['lora_alpha']}, dropout {lo['lora_dropout']} on "
               f"{'/'.join(lo['modules'])}, {cfg['epochs']} epochs")
    else:
        how = (f"full fine-tuning until the dev answer loss plateaus (eval every {cfg['eval_every']} steps, "
               f"patience {cfg['patience']}, min relative gain {cfg['min_delta']}, at most {cfg['epochs']} epochs)")
    return (f"{how}, lr {cfg['lr']:g}, batch {cfg['batch_size']}, {cfg['n_train']} train / {cfg['n_dev']} dev / "
            f"{cfg['n_test']} test examples")


def group_table(summary: dict) -> str:
    """Markdown: per mask the base and fine-tuned test accuracy, per seed, steps; then the paired Δ."""
    cfg, p = summary["config"], summary["paired"]
    lines = [f"MAS vs causal -- task {cfg['task']}, model {cfg['model']}, arm {cfg['arm']}: {_recipe(cfg)}; "
             f"seeds {', '.join(map(str, summary['seeds']))}", "",
             "| mask | base (no fine-tune) | test accuracy (mean ± std) | per seed | steps per seed |",
             "|---|---|---|---|---|"]
    for m in MASKS:
        acc = summary["arms"][m]["test_accuracy"]
        lines.append(f"| {m} | {_pct(summary['base_test_accuracy'][m])} % | {_pct(statistics.fmean(acc))} ± "
                     f"{_pct(statistics.stdev(acc))} % | {', '.join(map(_pct, acc))} | "
                     f"{', '.join(map(str, summary['arms'][m]['steps']))} |")
    lvl = round(100 * p["level"])
    lines += ["", f"Δ (MAS − causal), paired per seed: {', '.join(f'{100 * d:+.1f}' for d in p['diffs'])} points; "
              f"mean {100 * p['mean']:+.1f} points, {lvl} % t interval {_interval(p['t_interval'])}, "
              f"paired bootstrap {_interval(p['bootstrap_interval'])} ({p['n']} seeds)"]
    return "\n".join(lines)


def curve_series(runs: dict[str, dict[int, dict]], seeds: Sequence[int]) -> tuple[list[int], dict[str, list[float]]]:
    """(steps, {mask: mean dev accuracy over the seeds that evaluated at that step}); a step no seed
    of a mask reached is NaN (a gap)."""
    steps = sorted({c["step"] for m in MASKS for s in seeds for c in runs[m][s]["curve"]})
    series = {}
    for m in MASKS:
        at: dict[int, list[float]] = {}
        for s in seeds:
            for c in runs[m][s]["curve"]:
                at.setdefault(c["step"], []).append(c["dev_accuracy"])
        series[m] = [100 * statistics.fmean(at[k]) if k in at else math.nan for k in steps]
    return steps, series


def curve_page(runs: dict[str, dict[int, dict]], seeds: Sequence[int], *, title: str) -> Page:
    steps, series = curve_series(runs, seeds)
    fig = line_plot(series, x_labels=[str(k) for k in steps], title=f"{title}: dev accuracy vs steps",
                    y_label="dev accuracy (%)", x_label="optimiser step", y_range=(0.0, 100.0),
                    note=f"mean over seeds {', '.join(map(str, seeds))} that reached the step; "
                         "the test split is scored only at the end")
    return Page([fig], title=f"MAS protocol: {title}")


def collect(out: str | Path) -> tuple[Path, Path]:
    """``mas_protocol.json`` (every ``*/summary.json`` under ``out``) and ``mas_protocol.md``
    (one row per task, model and arm, then each group's table)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = [json.loads(p.read_text()) for p in sorted(out.glob("*/summary.json"))]
    lines = ["# MAS vs causal fine-tuning under the paper's protocol", "",
             "| task | model | arm | causal test acc. % | MAS test acc. % | Δ mean (points) | 95 % t interval "
             "| paired bootstrap | seeds |", "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        c, p = s["config"], s["paired"]
        lines.append(f"| {c['task']} | {c['model']} | {c['arm']} | {_pct(p['causal_mean'])} ± {_pct(p['causal_std'])} "
                     f"| {_pct(p['mas_mean'])} ± {_pct(p['mas_std'])} | {100 * p['mean']:+.1f} | "
                     f"{_interval(p['t_interval'])} | {_interval(p['bootstrap_interval'])} | {p['n']} |")
    if not summaries:
        lines.append("| (no finished group yet) |  |  |  |  |  |  |  |  |")
    for s in summaries:
        lines += ["", f"## {s['group']}", "", group_table(s)]
    md, js = out / "mas_protocol.md", out / "mas_protocol.json"
    md.write_text("\n".join(lines) + "\n")
    js.write_text(json.dumps(summaries, indent=1))
    return md, js
