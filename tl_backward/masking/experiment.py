"""Measured comparison: causal fine-tuning vs MAS fine-tuning on a segment-QA task.

Both arms start from copies of the same base model and see the same training examples in the same
order (same seeds), the same number of steps and the same answer-only loss; only the attention mask
differs (MAS prefill blocks vs plain causal). Each arm is scored on held-out examples under its own
mask: top-1 accuracy of the one-word answer after the causal response header.

Tasks:

* ``"world"`` -- the embedded model's segment-QA task (:meth:`tl_backward.zoo.world.World.segment_examples`):
  a system block and a user block (a random context about 2-4 people, then a question), each closed
  by ``###``, then ``answer :`` and the answer. Base model: the embedded ``facts-gpt2`` (pre-trained
  causally on this kind of text).
* ``"synthetic"`` -- a fallback built from the tiny test vocabulary (used when no embedded model is
  shipped): a system block listing the possible answers, then a user block such as ``"the cat is
  red . the dog is blue . what is the dog ? ###"``, then ``A :`` and the answer (random attributes); the base is a random tiny GPT-2 (so both arms train from scratch).
"""

from __future__ import annotations

import argparse
import html
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from tl_backward.core.device import input_device, on

from .. import zoo
from ..core.loading import load_model
from ..core.results import NOT_IN_DICT, FrozenDict, Record
from ..errors import TLBackwardError
from ..render.page import Page, html_figure
from ..zoo.tiny import tiny_model
from ..zoo.world import World
from .context import attention_patterns, run_segments
from .finetune import finetune, preserving_weights, restore_weights, snapshot_weights
from .render import mask_figure, patterns_figure, row_tokens, segment_tokens
from .segments import Segments, from_delimiter


@dataclass(frozen=True)
class QA:
    """One segment-QA example: ``prompt`` (blocks closed by the delimiter, then a causal header)
    and a one-token ``answer``."""

    prompt: str
    answer: str

    def __repr__(self) -> str:
        head = self.prompt if len(self.prompt) <= 60 else self.prompt[:30] + " … " + self.prompt[-27:]
        return f"QA({head!r}, answer={self.answer!r:.30})"


_ENTITIES = ("cat", "dog", "mat")
_ATTRIBUTES = ("red", "blue", "green", "big", "small", "hot", "cold", "good", "bad")
_SYSTEM = "Q : A is one of " + " ".join(_ATTRIBUTES) + " ."


def synthetic_task(n: int, *, split: str = "train", seed: int = 0) -> list[QA]:
    """``n`` examples over the tiny vocabulary; "train"/"test" use disjoint random streams."""
    if split not in ("train", "test"):
        raise TLBackwardError(f"split must be 'train' or 'test', got {split!r}", argument="split")
    rng = random.Random(f"mas-synthetic-{split}-{seed}")
    out = []
    for _ in range(n):
        things = rng.sample(_ENTITIES, rng.randint(2, 3))
        facts = {t: rng.choice(_ATTRIBUTES) for t in things}
        asked = rng.choice(things)
        context = " ".join(f"the {t} is {a} ." for t, a in facts.items())
        out.append(QA(f"{_SYSTEM} ### {context} what is the {asked} ? ### A :", facts[asked]))
    return out


def world_task(n: int, *, split: str = "train", world_seed: int = 0, mixed: bool = False) -> list[QA]:
    """``n`` segment-QA examples of the embedded models' world (``mixed``: the harder variant whose
    contexts mix home and job sentences)."""
    return [QA(e.prompt, e.answer) for e in World(world_seed).segment_examples(n, split, mixed=mixed)]


def qa_segments(model: Any, examples: Sequence[QA], *, delimiter: str = "###") -> Segments:
    """Right-padded Segments: each delimiter closes a block, the header is causal, the answer is the
    target (tokenised with a leading space, so BPE tokenizers see a word start)."""
    return from_delimiter(model, [e.prompt for e in examples], delimiter,
                          answer=[" " + e.answer for e in examples])


@torch.no_grad()
def answer_accuracy(model: Any, segments: Segments, *, mask: str = "mas", batch_size: int = 64) -> float:
    """Fraction of rows whose argmax at the last prompt position is the first answer token."""
    if mask not in ("mas", "causal"):
        raise TLBackwardError(f"mask must be 'mas' or 'causal', got {mask!r}", argument="mask")
    device = input_device(model)
    hits = 0
    for i in range(0, len(segments), batch_size):
        seg = segments.select(list(range(i, min(i + batch_size, len(segments))))).to(device)
        first = seg.target.long().argmax(-1)  # first answer column per row
        if not seg.target.any(-1).all() or (first == 0).any():
            raise TLBackwardError("every row needs an answer (target) after at least one prompt token",
                                  argument="segments")
        logits = on(run_segments(model, seg if mask == "mas" else seg.causal()), device)  # from the unembedding's device
        rows = torch.arange(len(seg), device=device)
        hits += int((logits[rows, first - 1].argmax(-1) == seg.tokens[rows, first]).sum())
    return hits / len(segments)


ARMS = ("causal", "mas")


@dataclass(frozen=True)
class ArmResult(Record):
    """One arm of :func:`mas_comparison` (``arm``: "causal" or "mas"), one entry per seed:
    held-out ``accuracy`` (fraction) under the arm's own mask, the mean of the last tenth of the
    training losses, wall ``seconds``; ``mean`` and ``std`` (sample std, 0 for one seed) of the
    accuracies; ``steps`` optimiser steps per run."""

    arm: str
    accuracy: tuple[float, ...]
    mean: float
    std: float
    final_train_loss: tuple[float, ...]
    seconds: tuple[float, ...] = field(compare=False)
    steps: int

    def __repr__(self) -> str:
        n = len(self.accuracy)
        return (f"ArmResult({self.arm}: {100 * self.mean:.1f} ± {100 * self.std:.1f} % over "
                f"{n} seed{'s' * (n != 1)}, {self.steps} steps)")


@dataclass(frozen=True)
class MASComparison(Record):
    """Result of :func:`mas_comparison`: the setup, the base model's held-out accuracy per mask
    (``base_accuracy["causal"|"mas"]``), one :class:`ArmResult` per arm (``arms["causal"|"mas"]``)
    and ``delta_mas_minus_causal``, the difference of their mean accuracies (fractions).

    With ``keep_models=True``: ``weights[arm]``, the first seed's fine-tuned weights (a state dict,
    loadable with :func:`tl_backward.masking.restore_weights`), and ``base_model``; both are left
    out of :meth:`to_dict` and of ``==``.
    """

    task: str
    model: str
    n_train: int
    n_test: int
    epochs: int
    lr: float
    batch_size: int
    seeds: tuple[int, ...]
    lora: bool
    base_accuracy: FrozenDict
    arms: FrozenDict
    delta_mas_minus_causal: float
    weights: FrozenDict | None = field(default=None, repr=False, compare=False, metadata=NOT_IN_DICT)
    base_model: Any = field(default=None, repr=False, compare=False, metadata=NOT_IN_DICT)

    def __repr__(self) -> str:
        c, m = self.arms["causal"], self.arms["mas"]
        return (f"MASComparison({self.task}, {self.model}: causal {100 * c.mean:.1f} %, MAS {100 * m.mean:.1f} %, "
                f"Δ {100 * self.delta_mas_minus_causal:+.1f} points; {len(self.seeds)} seed{'s' * (len(self.seeds) != 1)}, "
                f"{c.steps} steps)")

    def table(self) -> str:
        """Markdown table: per arm the base accuracy, the fine-tuned mean ± std and every seed's."""
        lines = [
            f"MAS vs causal fine-tuning -- task {self.task}, model {self.model}, "
            f"{self.n_train} train / {self.n_test} held-out examples, "
            f"{self.arms['mas'].steps} steps, lr {self.lr}, {len(self.seeds)} seeds"
            + (", LoRA" if self.lora else ", full fine-tuning"),
            "",
            "| arm | base model (no fine-tune) | fine-tuned accuracy (mean ± std) | per seed |",
            "|---|---|---|---|",
        ]
        for arm in ARMS:
            a = self.arms[arm]
            per = ", ".join(f"{100 * x:.1f}" for x in a.accuracy)
            lines.append(f"| {arm} | {100 * self.base_accuracy[arm]:.1f} % | "
                         f"{100 * a.mean:.1f} ± {100 * a.std:.1f} % | {per} |")
        lines += ["", f"Δ (MAS − causal) = {100 * self.delta_mas_minus_causal:+.1f} points"]
        return "\n".join(lines)


def _default_setup(task: str) -> tuple[Any, str]:
    if task in ("auto", "world") and "facts-gpt2" in zoo.list_models():
        return load_model("facts-gpt2"), "world"
    if task == "world":
        raise TLBackwardError("task='world' needs the embedded facts-gpt2 model, which is not shipped here",
                              argument="task")
    return tiny_model("gpt2", seed=0, n_layers=2, d_model=64, n_heads=4, n_ctx=64), "synthetic"


def mas_comparison(
    model: Any = None,
    *,
    task: str = "auto",
    n_train: int = 2000,
    n_test: int = 500,
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 16,
    seeds: Sequence[int] = (0, 1, 2),
    lora: Any = None,
    progress: bool = True,
    verbose: bool = True,
    keep_models: bool = False,
) -> MASComparison:
    """Fine-tune copies of ``model`` causally and with MAS (same data, steps, seeds); report held-out
    accuracy mean ± std over ``seeds``. Prints a table (``verbose``) and returns a :class:`MASComparison`.

    ``model=None`` loads the embedded ``facts-gpt2`` and its world task (``task="auto"``), or falls
    back to a random tiny GPT-2 on :func:`synthetic_task` when no embedded model is shipped.
    ``task`` = "world" | "synthetic" | "auto". The base model itself is not modified.
    ``keep_models`` fills ``result.weights[arm]``: the fine-tuned weights (state dict) of the first
    seed, loadable with :func:`tl_backward.masking.restore_weights`; and ``result.base_model``.
    """
    if len(seeds) < 1:
        raise TLBackwardError("seeds must list at least one seed (>= 3 for mean ± std)", argument="seeds")
    if model is None:
        model, task = _default_setup(task)
    elif task == "auto":
        tok = model.tokenizer
        task = "world" if tok.convert_tokens_to_ids("alice") != tok.unk_token_id else "synthetic"
    make = {"world": world_task, "synthetic": synthetic_task}.get(task)
    if make is None:
        raise TLBackwardError(f"task must be 'auto', 'world' or 'synthetic', got {task!r}", argument="task")
    train = qa_segments(model, make(n_train, split="train"))
    test = qa_segments(model, make(n_test, split="test"))

    base = {arm: answer_accuracy(model, test, mask=arm) for arm in ARMS}
    arms: dict[str, ArmResult] = {}
    kept: dict[str, Any] = {}
    for arm in ARMS:
        accs, losses, secs = [], [], []
        for seed in seeds:
            # Every run starts from the base weights, restored exactly afterwards.
            with preserving_weights(model):
                start = time.perf_counter()
                res = finetune(model, train, mask=arm, epochs=epochs, lr=lr, batch_size=batch_size,
                               lora=lora, seed=seed, progress=progress)
                secs.append(time.perf_counter() - start)
                accs.append(answer_accuracy(model, test, mask=arm))
                losses.append(float(res.losses[-max(1, len(res.losses) // 10):].mean()))
                if keep_models and arm not in kept:
                    kept[arm] = FrozenDict(snapshot_weights(model))
        arms[arm] = ArmResult(arm=arm, accuracy=tuple(accs), mean=statistics.fmean(accs),
                              std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                              final_train_loss=tuple(losses), seconds=tuple(secs), steps=res.steps)
    result = MASComparison(
        task=task, model=getattr(model.cfg, "model_name", type(model.original_model).__name__),
        n_train=n_train, n_test=n_test, epochs=epochs, lr=lr, batch_size=batch_size,
        seeds=tuple(seeds), lora=lora is not None, base_accuracy=FrozenDict(base), arms=FrozenDict(arms),
        delta_mas_minus_causal=arms["mas"].mean - arms["causal"].mean,
        weights=FrozenDict(kept) if keep_models else None, base_model=model if keep_models else None)
    if verbose:
        print(result.table())
    return result


def format_table(result: MASComparison) -> str:
    """``result.table()``: kept for code written when :func:`mas_comparison` returned a dict."""
    return result.table()


def mas_page(model: Any, segments: Any, *, layer: int = 0, row: int = 0, compare_causal: bool = True) -> Page:
    """Segments, the mask, and layer ``layer``'s attention under MAS (and under causal attention)."""
    valid = segments.valid[row].cpu()
    toks = row_tokens(segments, model, row)
    figs = [segment_tokens(segments, toks, row=row), mask_figure(segments, toks, row=row)]
    arms = ("mas", "causal") if compare_causal else ("mas",)
    for arm in arms:
        pat = attention_patterns(model, segments, layers=layer, mask=arm)[0, row][:, valid][:, :, valid]
        figs.append(patterns_figure(pat, toks, title=f"layer {layer} attention, {arm} mask"))
    return Page(figs, title="Segment-based attention masking")


def main(argv: Sequence[str] | None = None) -> MASComparison:
    """``python -m tl_backward.masking.experiment [--out DIR] [--n-train N] [--seeds 0 1 2] ...``

    Runs :func:`mas_comparison` on the embedded model (or the synthetic fallback), prints the table
    and writes ``mas_comparison.json``, ``mas_comparison.md`` and ``mas.html`` (segments, mask and
    attention of the MAS-fine-tuned model under MAS vs the causal one) to ``--out``.
    """

    ap = argparse.ArgumentParser(description="causal vs MAS fine-tuning on segment QA")
    ap.add_argument("--out", default="demos/out/mas")
    ap.add_argument("--task", default="auto", choices=("auto", "world", "synthetic"))
    ap.add_argument("--n-train", type=int, default=8000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy CPU)")
    ap.add_argument("--layer", type=int, default=0, help="layer whose attention the page shows")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    res = mas_comparison(task=args.task, n_train=args.n_train, n_test=args.n_test, epochs=args.epochs,
                         lr=args.lr, batch_size=args.batch_size, seeds=args.seeds, keep_models=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights, model = res.weights, res.base_model
    (out / "mas_comparison.json").write_text(json.dumps(res.to_dict(), indent=2))
    table = res.table()
    (out / "mas_comparison.md").write_text(table + "\n")

    make = world_task if res.task == "world" else synthetic_task
    example = qa_segments(model, make(1, split="test"))
    toks = [t for t, v in zip(example.str_tokens(model), example.valid[0].tolist()) if v]
    figs = [html_figure("<pre>" + html.escape(table) + "</pre>", title="Measured comparison"),
            segment_tokens(example, toks), mask_figure(example, toks)]
    for arm in ("mas", "causal"):
        with preserving_weights(model):
            restore_weights(model, weights[arm])
            pat = attention_patterns(model, example, layers=args.layer, mask=arm)[0, 0]
        figs.append(patterns_figure(pat, toks, title=f"{arm}-fine-tuned model, layer {args.layer}, {arm} mask"))
    path = Page(figs, title="MAS: segment-based attention masking").save(out / "mas.html")
    print(f"wrote {out / 'mas_comparison.json'}, {out / 'mas_comparison.md'} and {path}")
    return res


if __name__ == "__main__":
    main()

