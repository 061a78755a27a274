"""Size of a saved notebook that shows 10 tl_backward figures, per notebook bundle mode.

Builds a notebook of 10 code cells, each displaying one circuitsvis figure (5 ColoredTokens, 5
AttentionHeads, small props), executes it with nbclient in a kernel of this interpreter that imports
the checkout this file belongs to, and reports the size of the saved ``.ipynb``::

    python -m tests.render.notebook_size          # from the repository root

``"always"`` is what every output did before the bundle was sent once per session (each output
self-contained), ``"once"`` the default now. Used by ``tests/render/test_notebook.py``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from tests.test_notebooks import _kernel_manager

ROOT = Path(__file__).resolve().parents[2]
N_FIGURES = 10

SETUP = f"""import sys
sys.path.insert(0, {str(ROOT)!r})
import torch
import tl_backward
from tl_backward.render import attention_heads, colored_tokens, notebook_bundle
assert tl_backward.__file__.startswith({str(ROOT)!r}), tl_backward.__file__
"""


def figure_cell(i: int) -> str:
    """Code of the i-th figure cell: small props, so the bundle dominates what is saved."""
    if i % 2 == 0:
        return f"colored_tokens(['the', ' cell', ' {i}'], [0.1, -0.2, {i / 10}], title='figure {i}')"
    return (f"attention_heads(torch.eye(3)[None].repeat(2, 1, 1) * 0.{i}, ['a', 'b', 'c'], signed=True, "
            f"title='figure {i}')")


def build(mode: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cells = [SETUP + f"notebook_bundle({mode!r})"] + [figure_cell(i) for i in range(N_FIGURES)]
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    return nb


def execute(mode: str, workdir: Path) -> tuple[nbformat.NotebookNode, Path]:
    """Run the 10-figure notebook in ``mode``; returns it and the path it was saved to."""
    nb = build(mode)
    km = _kernel_manager(workdir / f"kernel-{mode}")
    client = NotebookClient(nb, km=km, timeout=300, resources={"metadata": {"path": str(workdir)}})
    try:
        client.execute(env=dict(os.environ, HF_HUB_OFFLINE="1"))
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    errors = [o for c in nb.cells for o in c.outputs if o.output_type == "error"]
    if errors:
        raise RuntimeError(f"the notebook failed: {errors[0].get('evalue')}")
    path = workdir / f"ten_figures_{mode}.ipynb"
    nbformat.write(nb, path)
    return nb, path


def html_outputs(nb: nbformat.NotebookNode) -> list[str]:
    """The text/html outputs of the figure cells, in order."""
    out = []
    for c in nb.cells[1:]:
        for o in c.outputs:
            if "text/html" in o.get("data", {}):
                html = o["data"]["text/html"]
                out.append("".join(html) if isinstance(html, list) else html)
    return out


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="tlb-nb-size-") as d:
        sizes = {m: execute(m, Path(d))[1].stat().st_size for m in ("always", "once")}
    print(json.dumps({"figures": N_FIGURES, "saved_bytes": sizes,
                      "ratio": round(sizes["always"] / sizes["once"], 2)}))
    for mode, size in sizes.items():
        print(f"{mode:>6}: {size / 1e6:.2f} MB saved notebook with {N_FIGURES} figures", file=sys.stderr)


if __name__ == "__main__":
    main()
