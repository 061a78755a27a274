"""The tl-backward command line: help, models, the report (in-process on a tiny model and end to end
through the installed console script on the embedded model), and one-line errors with exit code 2."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants as hub_constants

import tl_backward.core.loading as loading
from tl_backward import cli
from tl_backward.core.compat import HookedTransformer
from tl_backward.errors import TLBackwardError
from tl_backward.zoo import list_models, model_card

PROMPT = "the capital of france is"


def run(argv, capsys):
    """main(argv) -> (exit code, stdout, stderr); SystemExit codes are returned too."""
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tl-backward: error: ")
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture
def tiny_loaded(gpt2_model, monkeypatch):
    """Make the CLI load the tiny GPT-2 fixture instead of booting a model (fast, offline)."""
    seen = []

    def fake_load(name=None, **kw):
        seen.append(name)
        return gpt2_model

    monkeypatch.setattr(loading, "load_model", fake_load)
    return seen


# ------------------------------------------------------------------------- help and models
def test_help_explains_the_commands(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for words in ("report", "models", "Reversed Attention", "Backward Lens", "examples:",
                  'tl-backward report "the capital of france is"'):
        assert words in out
    code, out, _ = run(["report", "--help"], capsys)
    assert code == 0
    for words in ("PROMPT", "--target", "--model", "--out", "--layers", "default: the model's top",
                  "facts-gpt2", "leading", "no network"):
        assert words in out
    code, out, _ = run([], capsys)  # no command: the overview, not an error
    assert code == 0 and "usage: tl-backward" in out


def test_models_lists_the_embedded_models_with_card_figures(capsys):
    code, out, err = run(["models"], capsys)
    assert code == 0 and err == ""
    names = list_models()
    assert names, "no embedded model shipped"
    for name in names:
        card = model_card(name)
        block = out.split(name, 1)[1]
        assert f"{card['train_config']['n_layers']} layers" in block
        assert f"vocabulary {card['vocab_size']}" in block
        assert f"fact recall {card['figures']['fact_recall']['accuracy']:.0f} %" in block
    assert f"{names[0]}  (default)" in out
    assert "gpt2" in out.splitlines()[-1]


def test_models_when_none_is_shipped(capsys, monkeypatch):
    import tl_backward.zoo as zoo

    monkeypatch.setattr(zoo, "list_models", lambda: [])
    code, out, _ = run(["models"], capsys)
    assert code == 0 and "no embedded model" in out


# ------------------------------------------------------------------------- report
def test_report_prints_the_summary_and_writes_the_page(tiny_loaded, capsys, tmp_path):
    out_path = tmp_path / "r.html"
    code, out, err = run(["report", PROMPT, "--target", "rome", "--out", str(out_path), "--layers", "0", "1",
                          "--heads", "3"], capsys)
    assert code == 0, err
    assert tiny_loaded == [None]  # the default model
    assert out_path.is_file() and out_path.stat().st_size > 100_000
    assert out.startswith("model    tiny-gpt2")
    assert "target   rome (rank" in out and "Reversed Attention" in out and "Backward Lens" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"page: {out_path.resolve()}") and "MB" in last
    assert "Traceback" not in err


def test_report_quiet_and_model_name(tiny_loaded, capsys, tmp_path):
    out_path = tmp_path / "q.html"
    code, out, _ = run(["report", PROMPT, "-q", "--no-flow", "--model", "some/model", "-o", str(out_path)], capsys)
    assert code == 0
    assert out.strip() == str(out_path.resolve())
    assert tiny_loaded == ["some/model"]
    assert "flow graphs of layer" not in out_path.read_text(encoding="utf-8")


# ------------------------------------------------------------------------- errors: one line, exit 2
@pytest.mark.parametrize("argv, fragments", [
    (["report", ""], ["prompt is empty"]),
    (["report", "   "], ["prompt is empty"]),
    (["report", PROMPT, "--target", " "], ["--target is empty"]),
    (["report", PROMPT, "--layers", "x"], ["--layers", "invalid int value", "--help"]),
    (["report", PROMPT, "--heads", "0"], ["--heads"]),
    (["report", PROMPT, "--out", "page.txt"], ["--out must end in .html"]),
    (["report"], ["PROMPT"]),
    (["explain", PROMPT], ["invalid choice", "report"]),
    (["report", PROMPT, "--frobnicate"], ["unrecognized arguments"]),
])
def test_usage_errors_are_one_line(argv, fragments, capsys):
    code, out, err = run(argv, capsys)
    assert out == ""
    assert_one_line_error(code, err, *fragments)


@pytest.mark.parametrize("argv, fragments", [
    (["report", PROMPT, "--layers", "7"], ["--layers: layer 7 is out of range", "0..1"]),
    (["report", PROMPT, "--layers", "-3"], ["--layers: layer -3 is out of range"]),
    (["report", PROMPT, "--target", "zzz"], ["--target: target 'zzz' is not in the model's vocabulary"]),
])
def test_model_errors_are_one_line(tiny_loaded, argv, fragments, capsys, tmp_path):
    code, out, err = run(argv + ["--out", str(tmp_path / "x.html")], capsys)
    assert out == ""
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "x.html").exists()


@pytest.mark.bridge  # loads the default (bridge) model where a BridgeUnavailable is only text
def test_unknown_model_fails_fast_offline(capsys, monkeypatch, tmp_path):
    """The hub checks live in load_model (tests/core/test_loading.py); the CLI shows them as --model."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    code, out, err = run(["report", PROMPT, "--model", "no-such-model-xyz", "-o", str(tmp_path / "r.html")], capsys)
    assert_one_line_error(code, err, "--model: could not load model 'no-such-model-xyz'", "not an embedded model",
                          "HF_HUB_OFFLINE")
    # Without the offline flag, an unreachable hub is found by one short connect.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=1.0: False)
    code, out, err = run(["report", PROMPT, "--model", "no-such-model-xyz", "-o", str(tmp_path / "r.html")], capsys)
    assert_one_line_error(code, err, "--model: could not load model 'no-such-model-xyz'", "unreachable")


def test_library_errors_are_one_line_and_name_the_option(capsys, monkeypatch, tmp_path):
    """A TLBackwardError is shown with the option its .argument maps to; other errors as they are."""
    page = str(tmp_path / "r.html")
    for raised, shown in [(ValueError("could not load model 'x': multi\nline\n  detail"),
                           "error: could not load model 'x': multi line detail"),
                          (TLBackwardError("name 'x' is\nnot a directory", argument="name"),
                           "error: --model: name 'x' is not a directory"),
                          (TLBackwardError("device 'cuda' is not available", argument="device"),
                           "error: device 'cuda' is not available")]:  # no option for device: unchanged
        def broken(name=None, _err=raised, **kw):
            raise _err

        monkeypatch.setattr(loading, "load_model", broken)
        code, _, err = run(["report", PROMPT, "--model", "x", "-o", page], capsys)
        assert_one_line_error(code, err, shown)


def test_capitalised_target_is_told_to_use_lower_case(tiny_loaded, capsys, tmp_path):
    # The tiny vocabulary is lower-case ("rome"), so "Rome" reads as <unk>; lower case is the fix.
    page = tmp_path / "r.html"
    code, out, err = run(["report", PROMPT, "--target", "Rome", "--out", str(page)], capsys)
    assert_one_line_error(code, err, "--target: target 'Rome' is not in the model's vocabulary",
                          "lower-case: use --target rome")
    assert not page.exists()
    # No hint when lower case does not help either.
    code, out, err = run(["report", PROMPT, "--target", "Zzz", "--out", str(page)], capsys)
    assert_one_line_error(code, err, "--target: target 'Zzz'")
    assert "lower" not in err


# ------------------------------------------------------------------------- --out, checked before the analysis
@pytest.fixture
def no_analysis(monkeypatch):
    """Fail the test if the model is loaded or the analysis runs: --out errors must come first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded or the analysis ran before --out was checked")

    monkeypatch.setattr(loading, "load_model", forbidden)
    monkeypatch.setattr(cli, "build_report", forbidden)


def _unwritable_cases(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    folder = tmp_path / "page.html"
    folder.mkdir()
    cases = [(tmp_path / "missing" / "r.html", ["--out: cannot write", "does not exist"]),
             (blocker / "r.html", ["--out: cannot write", "is not a directory"]),
             (folder, ["--out:", "is a directory"])]
    if Path("/sys").is_dir():  # sysfs refuses new files even to root
        cases.append((Path("/sys/tl-backward-report.html"), ["--out: cannot write", "denied"]))
    return cases


def test_unwritable_output_fails_before_the_analysis(no_analysis, capsys, tmp_path):
    for path, fragments in _unwritable_cases(tmp_path):
        code, out, err = run(["report", PROMPT, "--no-flow", "--out", str(path)], capsys)
        assert out == ""
        assert_one_line_error(code, err, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "page.html"]  # the probe left nothing


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write to read-only folders")
def test_read_only_folder_fails_before_the_analysis(no_analysis, capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, err = run(["report", PROMPT, "--out", str(ro / "r.html")], capsys)
    finally:
        ro.chmod(0o700)
    assert_one_line_error(code, err, "--out: cannot write", "denied")


def test_existing_page_is_overwritten_and_left_alone_until_then(tiny_loaded, capsys, tmp_path):
    page = tmp_path / "r.html"
    page.write_text("old")
    code, _, err = run(["report", PROMPT, "--target", "zzz", "--out", str(page)], capsys)
    assert code == 2 and page.read_text() == "old"  # the writability probe (append mode) changed nothing
    code, _, err = run(["report", PROMPT, "--no-flow", "--out", str(page)], capsys)
    assert code == 0, err
    assert page.stat().st_size > 100_000


# ------------------------------------------------------------------------- the installed script
def _script() -> str:
    exe = Path(sys.executable).parent / "tl-backward"
    found = str(exe) if exe.exists() else shutil.which("tl-backward")
    if found is None:
        pytest.fail("the tl-backward console script is not installed (pip install -e .)")
    return found


@pytest.mark.bridge  # loads the default (bridge) model where a BridgeUnavailable is only text
@pytest.mark.slow
def test_console_script_end_to_end_on_the_embedded_model(tmp_path):
    """The real thing: the installed entry point, the embedded model, a page on disk; stdout holds
    the summary, stderr only progress lines."""
    page = tmp_path / "report.html"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([_script(), "report", PROMPT, "--target", "rome", "--out", str(page)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "model    facts-gpt2" in out and "predicts paris" in out and "target   rome (rank" in out
    writes_rome = [line for line in out.splitlines() if re.match(r"  L\d ", line)]
    assert len(writes_rome) == model_card("facts-gpt2")["train_config"]["n_layers"]
    assert all(" rome " in line for line in writes_rome)  # descent writes the new target in every layer
    for line in proc.stderr.strip().splitlines():
        assert re.fullmatch(r".+ \.\.\. done \(\d+\.\d s\)", line), line
    assert page.is_file() and 1_000_000 < page.stat().st_size < 5_000_000


# ------------------------------------------------------------------------- the HookedTransformer backend
def _lens_lines(out: str) -> list[str]:
    """The Backward Lens rows of the summary: layer and the tokens it writes (no figures)."""
    return [" ".join(w for w in line.split() if not re.match(r"^[\d.e+-]+$|^/$", w))
            for line in out.splitlines() if re.match(r"  L\d ", line)]


@pytest.mark.bridge  # compares with the bridge's report
@pytest.mark.skipif(HookedTransformer is None, reason="TransformerLens 4.x has no HookedTransformer")
def test_report_on_the_embedded_model_as_a_hooked_transformer(capsys, tmp_path):
    """--backend hooked loads facts-gpt2 as a HookedTransformer: the same prediction and the same tokens
    written per layer as the bridge's report of the same weights."""
    pages = {b: tmp_path / f"{b}.html" for b in ("bridge", "hooked")}
    outs = {}
    for backend, page in pages.items():
        code, outs[backend], err = run(["report", PROMPT, "--backend", backend, "--target", "rome", "--no-flow",
                                        "-o", str(page)], capsys)
        assert code == 0, err
        assert page.is_file()
    assert "model    facts-gpt2" in outs["hooked"] and "predicts paris" in outs["hooked"]
    assert _lens_lines(outs["hooked"]) == _lens_lines(outs["bridge"]) != []


@pytest.mark.skipif(HookedTransformer is None, reason="TransformerLens 4.x has no HookedTransformer")
def test_report_with_the_hooked_backend_alone(capsys, tmp_path):
    """--backend hooked needs no bridge (TransformerLens 2.x too): the summary and the page of facts-gpt2."""
    page = tmp_path / "h.html"
    code, out, err = run(["report", PROMPT, "--backend", "hooked", "--target", "rome", "-o", str(page)], capsys)
    assert code == 0, err
    assert "model    facts-gpt2" in out and "predicts paris" in out and "target   rome (rank" in out
    assert page.is_file() and page.stat().st_size > 100_000


@pytest.mark.skipif(HookedTransformer is not None, reason="this TransformerLens has HookedTransformer")
def test_hooked_backend_is_refused_in_one_line_where_removed(capsys, tmp_path):
    code, _, err = run(["report", PROMPT, "--backend", "hooked", "-o", str(tmp_path / "x.html")], capsys)
    assert_one_line_error(code, err, "--backend", "transformer_lens<4")
