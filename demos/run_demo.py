"""`make demo`: the main job on the embedded model, i.e.

    tl-backward report "the capital of france is" --target rome --out demos/out/report.html

facts-gpt2 answers "paris" with p ≈ 0.996. The report explains a *counterfactual* target, "rome":
the loss -log p(rome) is large, so its gradient is large too, and the Backward Lens shows in
words that a descent step writes "rome" into every layer's W_out. Run the same command without
``--target`` to explain the model's own answer. Prints the summary and the page's path.

    python demos/run_demo.py [PROMPT] [extra tl-backward report options]
"""

from __future__ import annotations

import sys
from pathlib import Path

PROMPT = "the capital of france is"
TARGET = "rome"
OUT = Path(__file__).resolve().parent / "out" / "report.html"


def main(argv: list[str]) -> int:
    from tl_backward.cli import main as cli

    prompt = argv[0] if argv and not argv[0].startswith("-") else PROMPT
    extra = argv[1:] if argv and not argv[0].startswith("-") else argv
    options = ["--target", TARGET] if prompt == PROMPT and "--target" not in extra else []
    if "--out" not in extra and "-o" not in extra:
        options += ["--out", str(OUT)]
    return cli(["report", prompt, *options, *extra])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
