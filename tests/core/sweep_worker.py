"""A sweep run as its own process: under ``torchrun`` (gloo) or alone, for tests/core/test_sweep.py.

``python -m tests.core.sweep_worker OUT [--checkpoint PATH] [--slow SECONDS]`` ranks the heads of
the gpt2 test fixture over PROMPTS and saves the ranking (every rank writes ``OUT.rank{r}``).
``--slow`` sleeps inside each batch's metric, so a test can kill the run between checkpoints.
``--job finetune`` instead runs ``mas_finetune`` (2 epochs, global batch 3) and saves the weights;
``--job means`` saves ``mean_over`` in both align modes, ``--job icl`` small ``icl_patching`` and
``icl_perturbation`` runs (tests/attention/test_sweeps.py).
"""

import argparse
import os
import time

import torch

from tests.conftest import build
from tl_backward import rank_heads
from tl_backward.attention import mean_over
from tl_backward.attention import zero_heads
from tl_backward.attention.icl import evaluate, icl_patching, icl_prompts
from tl_backward.attention.perturbation import icl_perturbation
from tl_backward.lens import evaluate_edits
from tl_backward.masking import mas_finetune
from tl_backward.masking import segments as S

PROMPTS = [("the capital of france is", " paris"), ("the cat sat on the", " mat"), ("a big dog ran", " up"),
           ("the capital of italy is", " rome"), ("one two three", " four"), ("red blue", " green"),
           ("who lives in paris", " yes"), ("the dog sat", " on"), ("five six seven", " eight")] * 2
# Five examples, global batch 3: the second batch has 2 rows, so with 2 ranks one rank gets one row.
BLOCKS = [["the cat sat on the mat", "where is the cat ?"], ["a big dog ran", "what ran ?"],
          ["red and blue", "what is red ?"], ["paris is in france", "where is paris ?"],
          ["one two three", "what is two ?"]]
ANSWERS = ["A : mat", "A : dog", "A : blue", "A : france", "A : two"]
EDIT_REQUESTS = [dict(prompt=p, target_new=new, target_true=old, paraphrases=[p.replace("the ", "a ", 1)],
                      neighborhood=["the dog sat on the", "red blue"])
                 for p, new, old in (("the capital of france is", "rome", "paris"), ("the cat sat on the", "dog", "mat"),
                                     ("a big dog ran", "down", "up"), ("one two three", "five", "four"),
                                     ("the capital of italy is", "paris", "rome"))]
SAME_LENGTH = [("the cat sat on the mat", " big"), ("the dog ran to the city", " cat"),
               ("a big red dog is hot", " cold"), ("one two three four five six", " seven"),
               ("the capital of france is paris", " yes")]

WORDS = [("hot", "cold"), ("big", "small"), ("good", "bad"), ("up", "down"), ("yes", "no"),
         ("one", "two"), ("three", "four"), ("five", "six"), ("seven", "eight"), ("nine", "ten")]
ICL_PAIRS = WORDS + [(b, a) for a, b in WORDS]  # as tests/attention/test_experiments.py


def mean_job(model) -> dict:
    """mean_over, exact (same-length prompts) and end (PROMPTS of 2 to 5 words, batch 2)."""
    out = {}
    for align, data in (("exact", SAME_LENGTH), ("end", PROMPTS[:7])):
        m = mean_over(model, iter(data), align=align, batch_size=2, prepend_bos=True)
        out[align] = {"maps": m.maps, "patterns": m.patterns, "metric": m.metric, "n": m.n_examples,
                      "tokens": m.tokens, "str_tokens": m.str_tokens, "layers": m.layers, "scales": m.scales}
    return out


def icl_job(model) -> dict:
    """Small ICL patching and perturbation runs on word pairs of the fixture's vocabulary."""
    train, test = ICL_PAIRS[:14], ICL_PAIRS[14:]
    patching = icl_patching(model, train[:10], test[:5], n_shots=(1,), etas=(-30.0,), n_train=5, batch_size=2,
                            verbose=False)
    perturbation = icl_perturbation(model, train[:10], test[:5], n_shots=(1,), n_train=4, fractions=(0.0, 0.5, 1.0),
                                    rankings=("reversed",), batch_size=2, verbose=False)
    run = perturbation[1]
    prompts = [p for p, _ in icl_prompts(train, test, 1, seed=1)]
    answers = [int(model.tokenizer.convert_tokens_to_ids(y)) for _, y in test]
    with zero_heads(model, run.ranking.order()[:3]):  # scored inside an ablation, as the perturbation does
        hits, nll = evaluate(model, (p for p in prompts), iter(answers), ks=(1, 10, 30), batch_size=2)
    return {"hits": hits, "nll": nll, "icl_rows": [r.to_dict() for r in patching.rows], "fit_loss": dict(patching.fit_loss),
            "perturbation_rows": [r.to_dict() for r in run.rows], "ranking": run.ranking.reversed_mean}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--job", choices=("rank_heads", "finetune", "edits", "means", "icl"), default="rank_heads")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if "RANK" in os.environ:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    model = build("gpt2")
    if args.job == "finetune":
        result = mas_finetune(model, S.from_blocks(model, BLOCKS, ANSWERS), epochs=2, batch_size=3, lr=1e-2,
                              seed=3, progress=False)
        torch.save({"weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
                    "losses": result.losses}, f"{args.out}.rank{rank}")
        _finish()
        return
    if args.job in ("means", "icl"):
        torch.save((mean_job if args.job == "means" else icl_job)(model), f"{args.out}.rank{rank}")
        _finish()
        return
    if args.job == "edits":
        ev = evaluate_edits(model, EDIT_REQUESTS, layer=-1, eta=3.0, progress=False)
        torch.save({"efficacy": ev.efficacy, "paraphrase": ev.paraphrase, "neighborhood": ev.neighborhood,
                    "applied": ev.applied}, f"{args.out}.rank{rank}")
        _finish()
        return
    metric = None
    if args.slow:
        cat = int(model.tokenizer.convert_tokens_to_ids("cat"))

        def slow_nll(logits, tokens):  # a user metric that takes its time (and reads the final position)
            time.sleep(args.slow)
            return -torch.log_softmax(logits[:, -1].float(), -1)[:, cat].sum()

        metric = slow_nll
    data = (p for p, _ in PROMPTS) if metric is not None else iter(PROMPTS)
    ranking = rank_heads(model, data, metric=metric, batch_size=2, progress=False, checkpoint=args.checkpoint)
    torch.save({"reversed_mean": ranking.reversed_mean, "reversed_std": ranking.reversed_std,
                "forward_mean": ranking.forward_mean, "n": ranking.n_examples}, f"{args.out}.rank{rank}")
    _finish()


def _finish() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
