"""README.md's Python examples are copy-paste correct: run them, in order, in one namespace.

Which blocks run: every fenced block whose info string is ``python`` (what a reader copies), in
document order, sharing one namespace (a later block may use ``model`` from an earlier one), in a
temporary working directory, offline. Two kinds are skipped:

* a block preceded by the line ``<!-- skip-test -->`` (invisible on GitHub and PyPI), for
  fragments that are not meant to run on their own;
* a block that *calls* a model loader with a hub name (``load_model("gpt2")``,
  ``boot_transformers("gpt2")``, ``from_pretrained(...)``: anything but an embedded model) --
  those need a network. A hub name in a comment (``# or tlb.load_model("gpt2")``) does not count.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP_MARK = "<!-- skip-test -->"
LOADERS = {"load_model", "boot_transformers", "boot_native", "from_pretrained"}
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")


def code_blocks(text: str) -> list[dict]:
    """Fenced code blocks: ``{"lang", "line" (1-based, first code line), "code", "skip"}``."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = len(m["indent"]), m["fence"], m["info"].strip()
        prev = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        body, j = [], i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence[0] * len(fence))
                                      and set(lines[j].strip()) == {fence[0]}):
            body.append(lines[j][indent:] if not lines[j][:indent].strip() else lines[j].lstrip())
            j += 1
        blocks.append(dict(lang=info.split()[0] if info else "", line=i + 2, code="\n".join(body) + "\n",
                           skip=prev == SKIP_MARK))
        i = j + 1
    return blocks


def hub_loads(code: str, embedded: set[str]) -> list[str]:
    """Model names (not embedded) that ``code`` passes to a loader call; comments are ignored."""
    names = []
    for node in ast.walk(ast.parse(code)):
        if not isinstance(node, ast.Call):
            continue
        fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        if fn not in LOADERS:
            continue
        args = node.args[:1] + [k.value for k in node.keywords if k.arg in ("name", "model_name")]
        names += [a.value for a in args
                  if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value not in embedded]
    return names


def runnable_blocks() -> list[dict]:
    import tl_backward

    embedded = set(tl_backward.list_models())
    return [b for b in code_blocks(README.read_text(encoding="utf-8"))
            if b["lang"] == "python" and not b["skip"] and not hub_loads(b["code"], embedded)]


def test_block_selection_rules():
    text = "\n".join([
        "```python", "x = 1", "```",
        "<!-- skip-test -->", "", "```python", "raise SystemExit", "```",
        "```bash", "make demo", "```",
        "```python", "m = tlb.load_model()  # or tlb.load_model(\"gpt2\")", "```",
        "```python", "m = tlb.load_model(\"gpt2\")", "```",
        "  ```python", "  y = 2", "  ```",
    ])
    blocks = code_blocks(text)
    assert [b["lang"] for b in blocks] == ["python", "python", "bash", "python", "python", "python"]
    assert [b["skip"] for b in blocks] == [False, True, False, False, False, False]
    assert blocks[0]["line"] == 2 and blocks[-1]["code"] == "y = 2\n"
    embedded = {"facts-gpt2"}
    assert hub_loads(blocks[3]["code"], embedded) == []
    assert hub_loads(blocks[4]["code"], embedded) == ["gpt2"]
    assert hub_loads('tlb.load_model(name="facts-gpt2")', embedded) == []
    assert hub_loads('AutoModel.from_pretrained("meta-llama/Llama-3.2-1B")', embedded) == ["meta-llama/Llama-3.2-1B"]


def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch):
    blocks = runnable_blocks()
    assert blocks, "README.md has no runnable ```python block (the quickstart should be one)"
    monkeypatch.chdir(tmp_path)  # examples that save pages write them here
    namespace: dict = {"__name__": "__readme__"}
    for b in blocks:
        # padded so that tracebacks show README.md's own line numbers
        code = compile("\n" * (b["line"] - 1) + b["code"], str(README), "exec")
        try:
            exec(code, namespace)
        except Exception as e:
            raise AssertionError(f"README.md block at line {b['line']} failed: {type(e).__name__}: {e}") from e
