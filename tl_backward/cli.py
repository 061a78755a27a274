"""``tl-backward``: the command line. Thin: parses arguments, loads the model, calls
:func:`tl_backward.report.build_report`, prints, saves.

Errors a user can make (unknown model, empty prompt, bad layer or target, unwritable --out) end
with one line ``tl-backward: error: ...`` on stderr and exit code 2, before any analysis runs. A
:class:`~tl_backward.errors.TLBackwardError` is shown with the option its ``.argument`` maps to.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from . import __version__, zoo
from .core import loading
from .core.adapter import get_adapter
from .errors import TLBackwardError
from .report import Progress, build_report, lower_case_helps

PROG = "tl-backward"
DEFAULT_PROMPT = "the capital of france is"

DESCRIPTION = """\
Read the backward pass of a transformer language model.

  report   explain one prediction: what the model predicts, which attention heads the
           gradient points at (Reversed Attention), what the gradient writes into each
           layer in words (Backward Lens) and how information flows (VISIT flow graphs);
           prints a summary and writes one offline HTML page.
  models   list the small trained models shipped inside the package (they run offline).
"""

EPILOG = """\
examples:
  tl-backward report "the capital of france is"
  tl-backward report "the capital of france is" --target rome --out rome.html
  tl-backward report "The Eiffel Tower is in the city of" --model gpt2 --target " Paris"
  tl-backward models

Run "tl-backward report --help" for the report's options.
"""

REPORT_DESCRIPTION = """\
Explain the model's next-token prediction for PROMPT.

The loss is -log p(TARGET) at the last position of PROMPT; TARGET defaults to the model's
own top prediction. A counterfactual target (a token the model does not predict) shows what
the gradient would write into the model to change its answer.

Prints: the prediction and its probability, the heads with the largest Reversed Attention
norm, and per layer what W_in reads and W_out's gradient writes at the last token (with the
target's rank). Writes: one self-contained HTML page (no network needed to view it).
"""

REPORT_EPILOG = """\
The embedded models (tl-backward models) have a lower-case, word-level vocabulary over a
small synthetic world of countries, cities, people and their jobs, e.g.
  "the capital of france is"    "the opposite of hot is"    "alice works as a"
For Hugging Face models such as gpt2 (needs network the first time), mind the leading
space of a word token: --target " Paris".
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage is one --help away)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        _fail(f"{message} (see {self.prog} --help)")


def _fail(message: str) -> None:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    rep = sub.add_parser("report", help="explain one prediction; print a summary, write an HTML page",
                         description=REPORT_DESCRIPTION, epilog=REPORT_EPILOG, formatter_class=fmt)
    rep.add_argument("prompt", metavar="PROMPT", help="the text whose next token to explain (quote it)")
    rep.add_argument("--target", "-t", metavar="T",
                     help="the next token to explain (default: the model's top prediction)")
    rep.add_argument("--model", "-m", metavar="NAME", default=None,
                     help="an embedded model (default: facts-gpt2), a local Hugging Face directory, "
                          "or a hub name such as gpt2 (needs network)")
    rep.add_argument("--backend", choices=("bridge", "hooked"), default="bridge",
                     help="load the model as a TransformerBridge (default) or a HookedTransformer "
                          "(needs TransformerLens < 4)")
    rep.add_argument("--out", "-o", metavar="PATH", default="report.html",
                     help="where to write the HTML page (default: report.html)")
    rep.add_argument("--layers", "-l", metavar="L", type=int, nargs="+", default=None,
                     help="analyse only these layers, e.g. --layers 0 2 (default: all)")
    rep.add_argument("--heads", metavar="K", type=int, default=10,
                     help="how many top heads' maps the page shows (default: 10)")
    rep.add_argument("--lens-tokens", metavar="N", type=int, default=16,
                     help="the Backward Lens tables project the last N prompt tokens (default: 16; 0 = all)")
    rep.add_argument("--no-flow", action="store_true", help="skip the flow graphs (faster, smaller page)")
    rep.add_argument("--quiet", "-q", action="store_true", help="print only the page's path")

    sub.add_parser("models", help="list the embedded models and their measured figures",
                   description="List the models shipped inside the package, with the figures "
                               "measured on their model cards.", formatter_class=fmt)
    return parser


# ------------------------------------------------------------------------------------------ models
def _card_lines(name: str) -> list[str]:
    try:
        card = zoo.model_card(name)
    except (OSError, ValueError):
        return [f"{name}  (no model card)"]
    cfg = card.get("train_config", {})
    figs = card.get("figures", {})
    arch = (f"{card.get('family', '?')}, {cfg.get('n_layers', '?')} layers x {cfg.get('n_heads', '?')} heads, "
            f"d_model {cfg.get('d_model', '?')}, vocabulary {card.get('vocab_size', '?')}, "
            f"{card.get('n_params', 0) / 1e6:.2f} M parameters")
    out = [name, f"  {arch}"]
    parts = []
    if "fact_recall" in figs:
        parts.append(f"fact recall {figs['fact_recall']['accuracy']:.0f} %")
    if "paraphrase_recall" in figs:
        parts.append(f"paraphrases {figs['paraphrase_recall']['accuracy']:.0f} %")
    if "tasks_with_gain_ge_20" in figs and "icl_gain_5_vs_0" in figs:
        parts.append(f"ICL: 5-shot gain >= 20 points on {figs['tasks_with_gain_ge_20']}/"
                     f"{len(figs['icl_gain_5_vs_0'])} tasks")
    if "segment_qa" in figs:
        parts.append(f"segment QA {figs['segment_qa']:.0f} %")
    if parts:
        out.append("  " + "; ".join(parts))
    return out


def cmd_models() -> int:
    names = zoo.list_models()
    if not names:
        print("no embedded model is shipped in this install; pass --model gpt2 (or another hub name) to report")
        return 0
    for name in names:
        lines = _card_lines(name)
        if name == zoo.DEFAULT_MODEL:
            lines[0] += "  (default)"
        print("\n".join(lines))
    print("\nAlso: any local Hugging Face directory, or a hub name such as gpt2 when online.")
    return 0


# ------------------------------------------------------------------------------------------ report
# The library names arguments as its functions spell them; on the command line they are options.
_OPTIONS = {"prompt": "PROMPT", "input": "PROMPT", "target": "--target", "layers": "--layers", "layer": "--layers",
            "heads": "--heads", "lens_tokens": "--lens-tokens", "name": "--model", "out": "--out",
            "backend": "--backend"}


def cmd_report(args: argparse.Namespace) -> int:
    try:
        out = _check_args(args)
        progress = Progress(True)
        _quiet_hf()
        with progress(f"loading {args.model or zoo.DEFAULT_MODEL}"):
            model = loading.load_model(args.model, backend=args.backend)
        _check_against_model(model, args)
        report = build_report(model, args.prompt, target=args.target, layers=args.layers, heads=args.heads,
                              lens_tokens=args.lens_tokens or None, flow=not args.no_flow, progress=progress)
    except (ValueError, TypeError) as err:  # TLBackwardError is both
        _fail(_one_line(err))
    try:
        path = report.save(out)
    except OSError as err:  # checked up front; this is the rare race (disk full, removed meanwhile)
        _fail(f"--out: cannot write {str(out)!r}: {err.strerror or err}")
    if not args.quiet:
        print(report.summary())
        print()
        print(f"page: {path.resolve()}  ({path.stat().st_size / 1e6:.1f} MB, opens offline in any browser)")
    else:
        print(path.resolve())
    return 0


def _check_args(args: argparse.Namespace) -> Path:
    """The checks that need no model; returns the page's path."""
    if not args.prompt.strip():
        raise TLBackwardError("the prompt is empty: pass some text, e.g. tl-backward report \"the capital of "
                              "france is\"")
    if args.target is not None and not args.target.strip():
        raise TLBackwardError("--target is empty: pass a word such as rome, or leave it out to explain the top "
                              "prediction")
    if args.heads < 1:
        raise TLBackwardError(f"--heads must be at least 1, got {args.heads}")
    if args.lens_tokens < 0:
        raise TLBackwardError(f"--lens-tokens must be 0 (all) or more, got {args.lens_tokens}")
    out = Path(args.out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise TLBackwardError(f"--out must end in .html, got {args.out!r}")
    _check_writable(out)
    return out


def _check_writable(out: Path) -> None:
    """Fail before the analysis if the page could not be saved at ``out``.

    Probes by opening: an existing file in append mode (content untouched), else a temporary file in
    the parent folder, removed at once. Permission bits alone would say yes to root on a read-only
    mount.
    """
    shown = str(out)
    if out.is_dir():
        raise TLBackwardError(f"{shown!r} is a directory: pass a file path such as {str(out / 'report.html')!r}",
                              argument="out")
    parent = out.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise TLBackwardError(f"cannot write {shown!r}: the folder {str(parent)!r} {what}; create it or pass "
                              "another path", argument="out")
    try:
        if out.exists():
            with open(out, "ab"):
                pass
        else:
            with tempfile.NamedTemporaryFile(dir=parent, prefix=".tl-backward-", suffix=".probe"):
                pass
    except OSError as err:
        raise TLBackwardError(f"cannot write {shown!r}: {err.strerror or err}", argument="out") from None


def _check_against_model(model: Any, args: argparse.Namespace) -> None:
    """--layers and --target against the loaded model, before the analysis; the lower-case hint is
    the one the report gives for prompts (:func:`tl_backward.report.lower_case_helps`)."""
    ad = get_adapter(model)
    if args.layers is not None:
        try:
            ad.layers(args.layers, distinct=False)  # the report takes a set of layers
        except (ValueError, TypeError) as err:
            raise TLBackwardError(str(err), argument="layers") from err
    if args.target is not None:
        try:
            ad.target_tokens(args.target)
        except (ValueError, TypeError) as err:
            hint = ""
            if lower_case_helps(ad, args.target):
                hint = f"; the model's vocabulary is lower-case: use --target {args.target.lower()}"
            raise TLBackwardError(f"{err}{hint}", argument="target") from err


def _quiet_hf() -> None:
    """Hub retries and loading chatter would bury the one-line error; keep errors only."""
    try:
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def _one_line(err: BaseException) -> str:
    """The message on one line, led by the option a TLBackwardError's ``.argument`` maps to."""
    text = " ".join(str(err).split()) or type(err).__name__
    option = _OPTIONS.get(getattr(err, "argument", None) or "")
    return f"{option}: {text}" if option else text


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "models":
        return cmd_models()
    return cmd_report(args)


if __name__ == "__main__":  # python -m tl_backward.cli
    sys.exit(main())


__all__ = ["main", "build_parser", "DEFAULT_PROMPT"]
