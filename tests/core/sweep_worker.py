"""A sweep run as its own process: under ``torchrun`` (gloo) or alone, for tests/core/test_sweep.py.

``python -m tests.core.sweep_worker OUT [--checkpoint PATH] [--slow SECONDS]`` ranks the heads of
the gpt2 test fixture over PROMPTS and saves the ranking (every rank writes ``OUT.rank{r}``).
``--slow`` sleeps inside each batch's metric, so a test can kill the run between checkpoints.
"""

import argparse
import os
import time

import torch

from tests.conftest import build
from tl_backward import rank_heads

PROMPTS = [("the capital of france is", " paris"), ("the cat sat on the", " mat"), ("a big dog ran", " up"),
           ("the capital of italy is", " rome"), ("one two three", " four"), ("red blue", " green"),
           ("who lives in paris", " yes"), ("the dog sat", " on"), ("five six seven", " eight")] * 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--slow", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if "RANK" in os.environ:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    model = build("gpt2")
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
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
