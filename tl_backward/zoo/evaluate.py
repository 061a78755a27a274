"""Measure an embedded model against the world's ground truth (top-1, BOS prepended).

All scores read the model's argmax at the last prompt token and compare it with the target's
(single) word-level token. Prompts get BOS prepended, as ``TransformerBridge.to_tokens`` does by
default, and are right-padded in batches (the padding never influences earlier positions).
"""

from __future__ import annotations

import random
from collections import defaultdict

import torch

from tl_backward.zoo.tokenizer import encode
from tl_backward.zoo.world import ICL_TASKS, World

from ..errors import TLBackwardError

ICL_SHOTS = (0, 1, 5, 10)


@torch.no_grad()
def top1_correct(model, tokenizer, prompts: list[str], targets: list[str], *, batch_size: int = 64) -> list[bool]:
    """Whether the model's argmax after each prompt is the first token of its target."""
    if len(prompts) != len(targets):
        raise TLBackwardError(f"prompts and targets differ in length ({len(prompts)} vs {len(targets)})",
                              argument="prompts")
    out: list[bool] = []
    for i in range(0, len(prompts), batch_size):
        ids = [encode(tokenizer, p) for p in prompts[i:i + batch_size]]
        tgt = [encode(tokenizer, t, prepend_bos=False)[0] for t in targets[i:i + batch_size]]
        width = max(map(len, ids))
        tokens = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(tokens)
        for r, row in enumerate(ids):
            tokens[r, :len(row)] = torch.tensor(row)
            mask[r, :len(row)] = 1
        logits = model(input_ids=tokens, attention_mask=mask).logits
        last = torch.tensor([len(r) - 1 for r in ids])
        pred = logits[torch.arange(len(ids)), last].argmax(-1)
        out += (pred == torch.tensor(tgt)).tolist()
    return out


def _mean(xs) -> float:
    xs = list(xs)
    return round(100.0 * sum(xs) / max(1, len(xs)), 2)


def fact_recall(model, tokenizer, world: World, *, held_out: bool = False, limit: int | None = None,
                seed: int = 0) -> dict:
    """Top-1 recall (%) over facts × training (or held-out) templates, overall and per relation.

    ``limit`` evaluates a fixed seeded sample of that many prompts instead of all of them.
    """
    items = world.recall_prompts(held_out=held_out)
    if limit is not None and limit < len(items):
        items = random.Random(seed).sample(items, limit)
    ok = top1_correct(model, tokenizer, [p for _, p, _ in items], [" " + t for _, _, t in items])
    per: dict[str, list[bool]] = defaultdict(list)
    for (rel, _, _), c in zip(items, ok):
        per[rel].append(c)
    return {"accuracy": _mean(ok), "n": len(ok), "per_relation": {r: _mean(v) for r, v in per.items()}}


def icl_accuracy(model, tokenizer, world: World, *, shots=ICL_SHOTS, tasks=None, repeats: int = 3) -> dict:
    """ICL top-1 accuracy (%) on each task's held-out test pairs: ``{task: {n_shots: acc}}``.

    Each test pair is asked ``repeats`` times with different seeded demonstrations (from train).
    """
    table: dict[str, dict[int, float]] = {}
    for task in tasks or ICL_TASKS:
        table[task] = {}
        for k in shots:
            rows = [ex for s in range(repeats) for ex in world.icl_examples(task, k, "test", seed=s)]
            table[task][k] = _mean(top1_correct(model, tokenizer, [r[0] for r in rows], [r[1] for r in rows]))
    return table


def segment_qa_accuracy(model, tokenizer, world: World, *, n: int = 400, split: str = "test",
                        mixed: bool = False) -> float:
    """Top-1 accuracy (%) of the one-word answer after the causal ``answer :`` header."""
    exs = world.segment_examples(n, split, mixed=mixed)
    return _mean(top1_correct(model, tokenizer, [e.prompt for e in exs], [" " + e.answer for e in exs]))


def evaluate(model, tokenizer, world: World, *, quick: bool = False) -> dict:
    """All card figures. ``quick`` uses small fixed samples (for smoke runs and progress logs)."""
    was_training = model.training
    model.eval()
    try:
        limit = 200 if quick else None
        recall = fact_recall(model, tokenizer, world, limit=limit)
        para = fact_recall(model, tokenizer, world, held_out=True, limit=limit)
        icl = icl_accuracy(model, tokenizer, world, repeats=1 if quick else 3,
                           tasks=list(ICL_TASKS)[:2] if quick else None)
        seg = segment_qa_accuracy(model, tokenizer, world, n=50 if quick else 400)
        seg_mixed = segment_qa_accuracy(model, tokenizer, world, n=50 if quick else 400, mixed=True)
    finally:
        model.train(was_training)
    gains = {t: round(v[5] - v[0], 2) for t, v in icl.items() if 5 in v and 0 in v}
    return {
        "fact_recall": recall,
        "paraphrase_recall": para,
        "icl": {t: {str(k): a for k, a in v.items()} for t, v in icl.items()},
        "icl_gain_5_vs_0": gains,
        "tasks_with_gain_ge_20": sum(g >= 20 for g in gains.values()),
        "segment_qa": seg,
        "segment_qa_mixed": seg_mixed,
    }
