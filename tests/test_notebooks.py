"""The demo notebooks (``demos/*.ipynb``): their shape, and executing them top to bottom.

Two kinds of tests:

* fast checks of the committed files (every run): each notebook opens with a Colab badge that links
  to itself and an install cell that only acts on Colab; every code cell is plain Python (no IPython
  magics, so nbclient, a script export and a linter all read the same code); outputs are stripped.
* ``@pytest.mark.notebooks``: execute every notebook with nbclient in a kernel of *this* Python
  (the current venv), each cell under a timeout, in a temporary directory (the pages the notebooks
  save land there, not in ``demos/out``), offline. Any cell error fails the test. Excluded from
  ``make test``; CI runs them as a separate step: ``python -m pytest -m notebooks``. Run times are
  printed (``-s``) and recorded as junit test-suite properties ``<name>_seconds``.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from tl_backward.core.compat import TL_VERSION, HookedTransformer

DEMOS = Path(__file__).resolve().parents[1] / "demos"
EXPECTED = ("quickstart", "reversed_attention", "backward_lens", "flow_graphs", "mas", "hooked_transformer")
# Notebooks that need a HookedTransformer run where TransformerLens still has it (make test-tl39).
NEEDS_HOOKED = ("hooked_transformer",)
NOTEBOOKS = sorted(p.stem for p in DEMOS.glob("*.ipynb"))
COLAB = "https://colab.research.google.com/github/tl-backward/tl_backward/blob/main/demos/{}.ipynb"
REPO = "git+https://github.com/tl-backward/tl_backward"
CELL_TIMEOUT = 300  # seconds per cell; every notebook takes well under a minute in total on 2 cores


def _cells(name: str) -> list[dict]:
    nb = json.loads((DEMOS / f"{name}.ipynb").read_text(encoding="utf-8"))
    return [dict(c, source="".join(c["source"]) if isinstance(c["source"], list) else c["source"])
            for c in nb["cells"]]


def test_the_expected_notebooks_exist():
    assert set(EXPECTED) <= set(NOTEBOOKS), f"missing: {sorted(set(EXPECTED) - set(NOTEBOOKS))}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_opens_with_colab_badge_and_colab_only_install(name):
    cells = _cells(name)
    badge = cells[0]
    assert badge["cell_type"] == "markdown"
    assert "colab-badge.svg" in badge["source"]
    assert f"]({COLAB.format(name)})" in badge["source"], "the badge must open this very notebook"
    install = cells[1]
    assert install["cell_type"] == "code"
    tree = ast.parse(install["source"])
    guards = [n for n in ast.walk(tree) if isinstance(n, ast.If) and "google.colab" in ast.unparse(n.test)]
    assert guards, "the install cell must be guarded by `if \"google.colab\" in sys.modules:`"
    assert REPO in ast.unparse(guards[0]), "install from the repository inside the Colab guard"
    # nothing outside the guard may install anything
    outside = [ast.unparse(n) for n in tree.body if not isinstance(n, ast.If)]
    assert not any("pip" in s for s in outside)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_code_cells_are_plain_python_and_outputs_are_stripped(name):
    code = [c for c in _cells(name) if c["cell_type"] == "code"]
    for i, c in enumerate(code):
        try:
            ast.parse(c["source"])
        except SyntaxError as e:  # e.g. a `%pip` or `!ls` magic
            pytest.fail(f"code cell {i} of {name} is not plain Python: {e}")
        assert not c.get("outputs") and c.get("execution_count") is None, \
            f"code cell {i} of {name} has saved outputs: strip them before committing"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_shows_how_to_switch_to_gpt2(name):
    text = "\n".join(c["source"] for c in _cells(name))
    assert 'load_model("gpt2")' in text
    setup = [c["source"] for c in _cells(name) if c["cell_type"] == "code" and "ONLINE =" in c["source"]]
    assert setup and re.search(r"^ONLINE = False\b", setup[0], re.M), "the embedded model must be the default"


def _kernel_manager(tmp_path: Path):
    """A kernel manager whose kernel runs this interpreter, whatever kernelspecs are installed."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = tmp_path / "kernels" / "tl-backward-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "tl_backward tests", "language": "python",
    }))
    ksm = KernelSpecManager(kernel_dirs=[str(spec.parent)], ensure_native_kernel=False)
    return KernelManager(kernel_name="tl-backward-test", kernel_spec_manager=ksm)


@pytest.mark.notebooks
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, tmp_path, record_testsuite_property):
    if name in NEEDS_HOOKED and HookedTransformer is None:
        pytest.skip(f"TransformerLens {TL_VERSION} has no HookedTransformer: make test-tl39 runs {name}")
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(DEMOS / f"{name}.ipynb", as_version=4)
    # The kernel must import tl_backward from this interpreter's environment.
    nb.cells.insert(0, nbformat.v4.new_code_cell(
        f"import sys\nassert sys.executable == {sys.executable!r}, sys.executable"))
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    km = _kernel_manager(tmp_path)
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(work)}})
    start = time.perf_counter()
    try:
        client.execute(env=env)  # raises CellExecutionError (with the cell's traceback) on any error
    finally:  # nbclient leaves a kernel it did not create running: stop ours
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    seconds = time.perf_counter() - start
    record_testsuite_property(f"{name}_seconds", round(seconds, 1))
    print(f"\n{name}.ipynb ran in {seconds:.1f} s")

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    # Every demo saves at least one offline page: the cells after the model ran for real.
    pages = list((work / "out").glob("*.html"))
    assert pages, f"{name} saved no page in out/"
    assert all(p.stat().st_size > 1000 for p in pages)
