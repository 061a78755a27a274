"""The MAS paper's protocol on the embedded models: MAS vs causal fine-tuning, paired per seed.

One *group* is (task, model, arm); it runs ``len(seeds)`` seeds × the two masks ("causal", "mas").
Within a seed both masks get the same everything except the attention mask: the same training
data in the same order (``finetune``'s seeded permutation; its per-epoch SHA-256 is recorded and
checked), the same LoRA initialisation and dropout stream (``torch.manual_seed(seed)``), the same
hyper-parameters, the same stopping rule. Loss on the answer token only (``finetune``).

Arms (:data:`ARMS`):

* ``"lora"`` -- the paper's recipe: peft LoRA r = 32, α = 64, dropout 0.05 on the query and value
  projections only, lr 2e-4 (constant, AdamW), 3 epochs, batch 16, gradient clip 1.0.
* ``"full"`` -- full fine-tuning, lr 1e-3 (the rate picked on the training stream before the first
  measured comparison, ``demos/mas_results.md``), until the dev answer loss plateaus: evaluated
  every ``eval_every`` steps, training stops after ``patience`` evaluations without a relative
  improvement of ``min_delta`` over the best so far (or at ``max_epochs``). The final weights are
  scored (no rollback to the best evaluation).

Tasks (:data:`TASKS`): ``"world"`` (segment QA, :func:`tl_backward.masking.experiment.world_task`)
and ``"choice"`` (multiple choice, :mod:`tl_backward.masking.choice`). Each has three splits:
train; dev (world: a separate seeded stream of the training distribution; choice: the dev facts)
used for the stopping rule and the accuracy-vs-steps curve; test (the world's test stream / the
test facts), scored once per run at the end and never used for a choice.

Files (``out/<task>-<model>-<arm>/``): ``runs/<mask>-seed<k>.json`` written as each run finishes
(a restart skips runs whose JSON exists with the same configuration), ``base.json`` (the base
model's accuracies), then ``summary.json``, ``table.md`` and ``curve.html`` (protocol_report.py).
CLI: ``python -m tl_backward.masking.protocol --task world --model facts-gpt2 --arm lora --seeds 0 1 2 3 4
--out demos/mas_protocol``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from tl_backward.core.device import input_device, on

from ..core import checks
from ..core.loading import load_model
from ..errors import TLBackwardError
from ..zoo.world import World
from .choice import choice_task
from .experiment import QA, answer_accuracy, qa_segments, world_task
from .families import run_masked
from .finetune import finetune, preserving_weights
from .protocol_report import collect, summarize
from .segments import Segments

MASKS = ("causal", "mas")
MODELS = ("facts-gpt2", "facts-llama")
PAPER_LORA = {"r": 32, "lora_alpha": 64, "lora_dropout": 0.05, "modules": ["q", "v"]}
ARMS = {
    "lora": {"lora": PAPER_LORA, "lr": 2e-4, "epochs": 3, "plateau": False},
    "full": {"lora": None, "lr": 1e-3, "epochs": 15, "plateau": True},
}
DEFAULTS = {"n_train": 4000, "n_dev": 200, "n_test": 500, "batch_size": 16, "eval_every": 50,
            "patience": 4, "min_delta": 0.01, "max_grad_norm": 1.0}


def _world_dev(n: int) -> list[QA]:
    return [QA(e.prompt, e.answer) for e in World(0).segment_examples(n, "train", seed=1)]


TASKS: dict[str, dict[str, Callable[[int], list[QA]]]] = {
    "world": {"train": lambda n: world_task(n, split="train"), "dev": _world_dev,
              "test": lambda n: world_task(n, split="test")},
    "choice": {split: (lambda n, s=split: choice_task(n, split=s)) for split in ("train", "dev", "test")},
}


def protocol_config(task: str, model: str, arm: str, **overrides: Any) -> dict:
    """The full, JSON-able configuration of a group: the arm's recipe, :data:`DEFAULTS`, then
    ``overrides`` (any key of those two, e.g. ``n_train=8``; ``epochs``/``lr`` override the arm)."""
    checks.one_of(task, "task", tuple(TASKS))
    checks.one_of(arm, "arm", tuple(ARMS))
    if not isinstance(model, str):
        raise TLBackwardError(f"model must be a model name (str), got {type(model).__name__}", argument="model")
    cfg = {"task": task, "model": model, "arm": arm, **ARMS[arm], **DEFAULTS}
    unknown = (set(overrides) - set(cfg)) | ({"task", "model", "arm"} & set(overrides))
    if unknown:
        raise TLBackwardError(f"unknown or fixed protocol settings {sorted(unknown)}; allowed "
                              f"{sorted(set(cfg) - {'task', 'model', 'arm'})}", argument="overrides")
    cfg.update(overrides)
    return cfg


@torch.no_grad()
def answer_metrics(model: Any, segments: Segments, *, mask: str, batch_size: int = 100) -> tuple[float, float]:
    """(mean NLL, top-1 accuracy) of the first answer token over the rows, in one forward per batch:
    ``-log p(answer | prompt)`` and ``argmax == answer`` at the last prompt position (for one-token
    answers the NLL is :func:`answer_loss` and the accuracy :func:`answer_accuracy`)."""
    checks.one_of(mask, "mask", MASKS)
    device = input_device(model)
    nll, hits = 0.0, 0
    for i in range(0, len(segments), batch_size):
        seg = segments.select(list(range(i, min(i + batch_size, len(segments))))).to(device)
        first = seg.target.long().argmax(-1)
        keep = (seg if mask == "mas" else seg.causal()).mask()
        logits = on(run_masked(model, seg.tokens, keep, seg.position_ids), device)
        rows = torch.arange(len(seg), device=device)
        logp = logits[rows, first - 1].float().log_softmax(-1)
        answer = seg.tokens[rows, first]
        nll += float(-logp[rows, answer].double().sum())
        hits += int((logp.argmax(-1) == answer).sum())
    return nll / len(segments), hits / len(segments)


def order_digest(rows: Sequence[int]) -> str:
    """SHA-256 (first 16 hex digits) of a sequence of row indices (as int64 little-endian bytes)."""
    return hashlib.sha256(torch.tensor(list(rows), dtype=torch.int64).numpy().tobytes()).hexdigest()[:16]


class _Tracker:
    """``finetune``'s ``on_step``: hashes the data order per epoch, evaluates the dev split every
    ``eval_every`` steps (eval mode, then train mode again) and applies the plateau rule."""

    def __init__(self, model: Any, dev: Segments, mask: str, cfg: dict, n: int, total: int):
        self.model, self.dev, self.mask, self.cfg, self.n, self.total = model, dev, mask, cfg, n, total
        self.epoch_rows: list[int] = []
        self.digests: list[str] = []
        self.curve: list[dict] = []
        self.window: list[float] = []
        self.best, self.bad, self.stopped = math.inf, 0, False

    def evaluate(self, step: int) -> None:
        self.model.eval()
        loss, acc = answer_metrics(self.model, self.dev, mask=self.mask)
        if step:
            self.model.train()
        train = sum(self.window) / len(self.window) if self.window else None
        self.curve.append({"step": step, "train_loss": train, "dev_loss": loss, "dev_accuracy": acc})
        self.window = []
        if loss < self.best * (1 - self.cfg["min_delta"]):
            self.best, self.bad = loss, 0
        elif step:
            self.bad += 1

    def __call__(self, step: int, loss: float, rows: torch.Tensor) -> bool:
        self.window.append(loss)
        self.epoch_rows += rows.tolist()
        if len(self.epoch_rows) == self.n:
            self.digests.append(order_digest(self.epoch_rows))
            self.epoch_rows = []
        if step % self.cfg["eval_every"] == 0 or step == self.total:
            self.evaluate(step)
            self.stopped = bool(self.cfg["plateau"] and self.bad >= self.cfg["patience"] and step < self.total)
            return self.stopped
        return False


def run_one(model: Any, cfg: dict, data: dict[str, Segments], mask: str, seed: int, *,
            progress: bool = False) -> dict:
    """One fine-tuning run (weights restored afterwards): the JSON record of ``mask`` and ``seed``."""
    n = len(data["train"])
    total = cfg["epochs"] * math.ceil(n / cfg["batch_size"])
    tracker = _Tracker(model, data["dev"], mask, cfg, n, total)
    lora = None if cfg["lora"] is None else {**cfg["lora"], "modules": tuple(cfg["lora"]["modules"])}
    with preserving_weights(model):
        tracker.evaluate(0)
        start = time.perf_counter()
        res = finetune(model, data["train"], mask=mask, epochs=cfg["epochs"], lr=cfg["lr"],
                       batch_size=cfg["batch_size"], lora=lora, seed=seed, max_grad_norm=cfg["max_grad_norm"],
                       progress=progress, on_step=tracker)
        seconds = time.perf_counter() - start
        if tracker.epoch_rows:  # a plateau stop mid-epoch: the partial epoch's order
            tracker.digests.append(order_digest(tracker.epoch_rows) + "-partial")
        test = answer_accuracy(model, data["test"], mask=mask)
    return {"config": cfg, "mask": mask, "seed": seed, "steps": res.steps, "stopped_early": tracker.stopped,
            "seconds": seconds, "test_accuracy": test, "order_digests": tracker.digests,
            "curve": tracker.curve, "losses": res.losses.tolist()}


def group_dir(out: str | Path, cfg: dict) -> Path:
    return Path(out) / f"{cfg['task']}-{cfg['model']}-{cfg['arm']}"


def run_group(model: Any, cfg: dict, seeds: Sequence[int], out: str | Path, *, progress: bool = True,
              log: Callable[[str], Any] = print) -> dict:
    """Every (seed, mask) run of the group ``cfg`` not already in ``out`` (resumable), then the
    group's summary (:func:`tl_backward.masking.protocol_report.summarize`); returns the summary."""
    seeds = [checks.count(s, "seeds") for s in seeds]
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise TLBackwardError(f"seeds must list at least 2 distinct seeds (the protocol asks for >= 5), got {seeds}",
                              argument="seeds")
    if len(seeds) < 5:
        log(f"note: {len(seeds)} seeds; the protocol asks for at least 5 (a smoke run otherwise)")
    folder = group_dir(out, cfg)
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    make = TASKS[cfg["task"]]
    data = {split: qa_segments(model, make[split](cfg[f"n_{split}"])) for split in ("train", "dev", "test")}
    base_path = folder / "base.json"
    if not _matches(base_path, cfg):
        base = {"config": cfg, **{f"{split}_accuracy": {m: answer_accuracy(model, data[split], mask=m) for m in MASKS}
                                  for split in ("dev", "test")}}
        _write(base_path, base)
    todo = [(s, m) for s in seeds for m in MASKS]
    for k, (seed, mask) in enumerate(todo, 1):
        path = folder / "runs" / f"{mask}-seed{seed}.json"
        tag = f"[{folder.name} {k}/{len(todo)}] {mask} seed {seed}"
        if _matches(path, cfg):
            log(f"{tag}: done before, skipped ({path})")
            continue
        rec = run_one(model, cfg, data, mask, seed, progress=progress)
        _write(path, rec)
        log(f"{tag}: test accuracy {100 * rec['test_accuracy']:.1f} %, {rec['steps']} steps"
            f"{' (plateau)' if rec['stopped_early'] else ''}, {rec['seconds']:.0f} s")
    return summarize(folder, seeds)


def _matches(path: Path, cfg: dict) -> bool:
    """True if ``path`` holds a finished record of exactly ``cfg``; a record of another
    configuration is refused (a silent mix of settings would corrupt the pairing)."""
    if not path.is_file():
        return False
    old = json.loads(path.read_text()).get("config")
    if old != json.loads(json.dumps(cfg)):
        raise TLBackwardError(f"{path} was written with another configuration ({old}); use another --out or "
                              "delete that folder", argument="out")
    return True


def _write(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".json.tmp")  # write then rename: a killed run leaves no half-written record
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """``python -m tl_backward.masking.protocol --task world choice --model facts-gpt2 facts-llama
    --arm lora full --seeds 0 1 2 3 4 --out demos/mas_protocol`` (every combination given), then
    ``out/mas_protocol.md`` / ``.json`` over every finished group in ``out``; ``--collect`` only
    rewrites those two files."""
    ap = argparse.ArgumentParser(description="MAS vs causal fine-tuning under the MAS paper's protocol")
    ap.add_argument("--task", nargs="+", default=["world"], choices=tuple(TASKS))
    ap.add_argument("--model", nargs="+", default=["facts-gpt2"], choices=MODELS)
    ap.add_argument("--arm", nargs="+", default=["lora"], choices=tuple(ARMS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", default="demos/mas_protocol")
    for key, value in DEFAULTS.items():
        ap.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    ap.add_argument("--epochs", type=int, default=None, help="override the arm's epochs (full: the maximum)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy CPU)")
    ap.add_argument("--collect", action="store_true", help="only rewrite out/mas_protocol.md/.json")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    summaries = []
    if not args.collect:
        overrides = {k: getattr(args, k) for k in DEFAULTS}
        if args.epochs is not None:
            overrides["epochs"] = args.epochs
        for name in args.model:
            model = load_model(name)
            for task in args.task:
                for arm in args.arm:
                    cfg = protocol_config(task, name, arm, **overrides)
                    summaries.append(run_group(model, cfg, args.seeds, args.out, progress=not args.no_progress))
    md, js = collect(args.out)
    print(f"wrote {md} and {js}")
    return summaries


if __name__ == "__main__":
    main()
