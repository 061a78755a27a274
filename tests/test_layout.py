"""The package's shape, read from its source (tests/layout.py): imports point one way, files and
functions stay short, private names stay in their file, docstrings cite only this repository."""

import pytest

from tests import layout

MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80  # body, docstring excluded


@pytest.fixture(scope="module")
def imports():
    return layout.all_imports()


def test_the_scanner_sees_the_package(imports):
    # Guard against a silently empty scan: every feature folder imports core.
    folders = {layout.folder(i.source) for i in imports if layout.folder(i.target) == "core"}
    assert {"attention", "lens", "flow", "masking", "report"} <= folders


def test_no_import_circle(imports):
    assert layout.cycles(imports) == []


def test_imports_point_down_the_layers(imports):
    # core and render import nothing above them; a paper's folder imports core, render, errors, zoo
    # and itself; only cli imports the report.
    assert [f"{i.source} -> {i.target} (line {i.line})" for i in layout.upward(imports)] == []


def test_no_function_local_import_of_own_modules(imports):
    assert [f"{i.source} -> {i.target} (line {i.line})" for i in imports if i.local] == []


def test_private_names_stay_in_their_module():
    assert layout.private_imports() == []


def test_docstrings_cite_this_repository_only():
    assert layout.spec_citations() == []


def test_files_and_functions_are_short():
    long_files, long_functions = [], []
    for mod, path in layout.modules().items():
        n = len(path.read_text().splitlines())
        if n > MAX_FILE_LINES:
            long_files.append((mod, n))
        long_functions += [(f"{mod}:{name}", k) for name, k in layout.function_lengths(path)
                           if k > MAX_FUNCTION_LINES]
    assert long_files == [] and long_functions == []


def test_the_scanner_catches_a_circle(tmp_path, monkeypatch):
    # The checks above must be able to fail: a two-module circle and a function-local import.
    pkg = tmp_path / "tl_backward"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("from .y import f\n")
    (pkg / "a" / "y.py").write_text("def f():\n    from .x import g\n")
    monkeypatch.setattr(layout, "ROOT", pkg)
    found = layout.all_imports()
    assert layout.cycles(found) == [["tl_backward.a.x", "tl_backward.a.y"]]
    assert [(i.source, i.local) for i in found if i.local] == [("tl_backward.a.y", True)]


def test_model_devices_are_read_in_core_device_only():
    # A model dispatched over several devices has no one device or dtype: one parameter, model.device
    # or cfg.device stands for the embedding's device only by accident (tl_backward/core/device.py).
    assert layout.device_reads() == []


@pytest.mark.parametrize("source, hits", [
    ("d = next(model.parameters()).device", 1),
    ("d = next(iter(self.model.parameters())).dtype", 1),
    ("d = model.cfg.device", 1),
    ("d = hf.dtype", 1),
    ("d = tokens.to(logits.device)", 0),  # tensors' devices are the rule, not the exception
    ("for p in model.parameters(): p.requires_grad_(False)", 0),
])
def test_device_read_scanner(source, hits):
    assert len(layout.device_reads_in(source)) == hits
