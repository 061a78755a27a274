"""The README's install line holds: the project builds into a wheel that carries the embedded
models, installs into a fresh virtual environment, and the Quickstart runs there -- from a directory
outside the checkout, so the checkout itself is never imported.

Offline by construction: the wheel is built with ``pip wheel --no-deps --no-build-isolation`` (the
build backend, setuptools, comes from this environment) from a copy of the sources (no ``build/``
or ``*.egg-info`` left in the checkout), and installed with ``--no-deps --no-index``. The fresh
venv gets its dependencies (torch, TransformerLens, ...) by a ``.pth`` line pointing at this
environment's site-packages, written only *after* the install so pip never sees (or touches) the
packages of this environment. A ``.pth`` path line is appended to ``sys.path`` without running that
directory's own ``.pth`` files, so an editable install of tl_backward there stays inactive.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.test_readme import code_blocks

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "tl_backward")
MODELS = ROOT / "tl_backward" / "zoo" / "models"


def _run(cmd, cwd, timeout=600, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PIP_NO_INDEX="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env, **kw)
    assert proc.returncode == 0, f"{cmd[:4]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(
            ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__", "*.pyc")}
                                        if (ROOT / name).is_dir() else {}))
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", out, "."], cwd=src)
    wheels = list(out.glob("tl_backward-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    """A fresh venv with the wheel installed and this environment's packages as dependencies."""
    root = tmp_path_factory.mktemp("venv") / "env"
    _run([sys.executable, "-m", "venv", root], cwd=root.parent)
    py = root / "bin" / "python"
    _run([py, "-m", "pip", "install", "--no-deps", "--no-index", wheel], cwd=root.parent)
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=root.parent).strip())
    (site / "zz_tlb_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return root, site


def test_wheel_carries_every_embedded_model_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"tl_backward/zoo/models/{p.relative_to(MODELS).as_posix()}"
                for p in MODELS.glob("*/*") if p.is_file()}
    assert expected and any(n.endswith("model.safetensors") for n in expected)
    assert expected <= names, sorted(expected - names)
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "tl-backward = tl_backward.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def _quickstart() -> str:
    """The README's Quickstart section: its Python blocks, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Quickstart\n(.*?)^## ", text, re.S | re.M).group(1)
    blocks = [b["code"] for b in code_blocks(section) if b["lang"] == "python"]
    assert len(blocks) >= 2
    return "\n".join(blocks)


@pytest.mark.bridge  # loads the default (bridge) model where a BridgeUnavailable is only text
def test_quickstart_runs_from_the_installed_wheel(venv, tmp_path):
    root, site = venv
    work = tmp_path / "elsewhere"  # outside the checkout: only the installed copy can be imported
    work.mkdir()
    script = work / "quickstart.py"
    script.write_text(
        "import tl_backward\n"
        f"assert tl_backward.__file__.startswith({str(site)!r}), tl_backward.__file__\n"
        + _quickstart()
        + "\nprint('installed at', tl_backward.__file__)\n", encoding="utf-8")
    out = _run([root / "bin" / "python", script], cwd=work)
    assert f"installed at {site}" in out
    assert (work / "analysis.html").stat().st_size > 100_000  # the page with circuitsvis inlined
    # the console script too, and it lists the models shipped inside the wheel
    listing = _run([root / "bin" / "tl-backward", "models"], cwd=work)
    for card in MODELS.glob("*/card.json"):
        assert card.parent.name in listing
