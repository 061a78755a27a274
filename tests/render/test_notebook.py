"""circuitsvis's bundle in notebooks: sent once per kernel session (outside Colab), reused by later
outputs, re-sent when needed; saved notebooks shrink accordingly; outputs mount in any order and say
what to do when the output carrying the bundle is gone."""

import sys

import pytest

from tl_backward.errors import TLBackwardError
from tl_backward.render import notebook as N
from tl_backward.render import page as P
from tl_backward.render.figures import colored_tokens

BUNDLE_MARK = "var CircuitsVis="


@pytest.fixture()
def kernel(monkeypatch):
    """Pretend to run inside a kernel: ``kernel.request = (cell id, msg id)`` of the current
    execution. The 'sent' state is reset before and after."""

    class Kernel:
        request = ("cell-a", "msg-1")

    monkeypatch.setattr(N, "_kernel_request", lambda: Kernel.request)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    N._notebook.update(mode=None, sent=None)
    yield Kernel
    N._notebook.update(mode=None, sent=None)


def _carries_bundle(fig) -> bool:
    return BUNDLE_MARK in fig._repr_html_()


def test_bundle_sent_once_per_session_then_reused(kernel):
    f = colored_tokens(["a", "b"], [1.0, 2.0])
    assert _carries_bundle(f)
    assert not _carries_bundle(f)           # same execution, second figure
    kernel.request = ("cell-b", "msg-2")
    assert not _carries_bundle(f)           # a later cell reuses it
    out = f._repr_html_()
    assert "CircuitsVis.render(" in out and 'class="tlb-cv"' in out  # still mounts
    assert not _carries_bundle(P.html_figure("<p>x</p>") + f)  # pages too


def test_bundle_resent_when_its_cell_reruns_or_on_request(kernel):
    f = colored_tokens(["a"], [1.0])
    assert _carries_bundle(f)
    kernel.request = ("cell-b", "msg-2")
    assert not _carries_bundle(f)
    kernel.request = ("cell-a", "msg-3")    # the carrying cell runs again: its output is replaced
    assert _carries_bundle(f)
    kernel.request = ("cell-c", "msg-4")
    assert not _carries_bundle(f)
    assert P.notebook_bundle("once") == "once"  # setting a mode forgets that it was sent
    assert _carries_bundle(f)
    kernel.request = (None, "msg-5")       # frontend without cell ids: reuse
    assert not _carries_bundle(f)


def test_html_only_figures_do_not_consume_the_first_send(kernel):
    assert not _carries_bundle(P.html_figure("<p>x</p>"))
    assert _carries_bundle(colored_tokens(["a"], [1.0]))


def test_always_mode_colab_and_outside_a_kernel_are_self_contained(kernel, monkeypatch):
    f = colored_tokens(["a"], [1.0])
    assert P.notebook_bundle("always") == "always"
    assert _carries_bundle(f) and _carries_bundle(f)
    N._notebook.update(mode=None, sent=None)
    monkeypatch.setitem(sys.modules, "google.colab", type(sys)("google.colab"))
    assert P.notebook_bundle() == "always"  # Colab: every output is its own iframe
    assert _carries_bundle(f) and _carries_bundle(f)
    monkeypatch.delitem(sys.modules, "google.colab")
    assert P.notebook_bundle() == "once"
    monkeypatch.setattr(N, "_kernel_request", lambda: None)  # a script, not a kernel
    assert _carries_bundle(f) and _carries_bundle(f)


def test_saved_pages_always_hold_the_bundle(kernel):
    f = colored_tokens(["a"], [1.0])
    f._repr_html_()
    assert f.to_html().count(BUNDLE_MARK) == 1 and P.Page([f, f]).to_html().count(BUNDLE_MARK) == 1


def test_notebook_bundle_validates():
    with pytest.raises(TLBackwardError, match="mode must be one of") as e:
        P.notebook_bundle("sometimes")
    assert e.value.argument == "mode"


def test_kernel_request_outside_a_kernel_is_none():
    assert N._kernel_request() is None  # pytest is not an IPython kernel


# ------------------------------------------------------------------ a real notebook (nbclient)
@pytest.fixture(scope="module")
def notebooks(tmp_path_factory):
    pytest.importorskip("nbclient")
    from tests.render import notebook_size as S

    d = tmp_path_factory.mktemp("nb")
    return {mode: S.execute(mode, d) for mode in ("always", "once")}, S


@pytest.mark.slow
def test_ten_figure_notebook_holds_the_bundle_once(notebooks):
    runs, S = notebooks
    always, once = (S.html_outputs(runs[m][0]) for m in ("always", "once"))
    assert len(always) == len(once) == S.N_FIGURES
    assert [h.count(BUNDLE_MARK) for h in always] == [1] * S.N_FIGURES
    assert [h.count(BUNDLE_MARK) for h in once] == [1] + [0] * (S.N_FIGURES - 1)
    size = {m: runs[m][1].stat().st_size for m in runs}
    bundle = len(P.bundle_js().encode())
    # 'always' stores the bundle 10 times, 'once' once; the rest (props, ids, JSON) is small.
    assert size["always"] > S.N_FIGURES * bundle
    assert bundle < size["once"] < 1.3 * bundle
    print(f"\nsaved notebook, {S.N_FIGURES} figures: {size['always'] / 1e6:.2f} MB per-output bundle, "
          f"{size['once'] / 1e6:.2f} MB bundle once")


def _shared_document(outputs, path):
    """Outputs in one document, as JupyterLab, Notebook 7 and VS Code place them."""
    path.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>'
                    + "\n".join(f'<div class="cell-output">{h}</div>' for h in outputs)
                    + "</body></html>", encoding="utf-8")
    return path


def _mounts(path):
    from tests.browser import dom_after_scripts, parse_dom

    dom = dom_after_scripts(path)
    tree = parse_dom(dom)
    mounts = {i: el for i, el in tree.by_id.items() if i.endswith("-cv")}
    drawn = [i for i, el in mounts.items() if el["tags"].get("span", 0) + el["tags"].get("canvas", 0) > 0]
    waiting = [i for i, el in mounts.items() if "sent once" in "".join(el["text"])]
    return mounts, drawn, waiting, dom


@pytest.mark.slow
@pytest.mark.browser
def test_reused_bundle_mounts_in_any_order_and_explains_a_missing_one(notebooks, tmp_path):
    from tests.browser import require_chromium

    require_chromium()
    runs, S = notebooks
    once = S.html_outputs(runs["once"][0])
    # saved notebook reopened: all outputs rendered in order
    mounts, drawn, waiting, dom = _mounts(_shared_document(once, tmp_path / "in_order.html"))
    assert len(mounts) == len(drawn) == S.N_FIGURES and not waiting and 'class="tlb-error"' not in dom
    # a frontend that renders later cells first (virtualised notebooks): they wait for the bundle
    mounts, drawn, waiting, _ = _mounts(_shared_document(once[::-1], tmp_path / "reversed.html"))
    assert len(drawn) == S.N_FIGURES and not waiting
    # the output carrying the bundle was cleared: the others say so instead of staying blank
    mounts, drawn, waiting, _ = _mounts(_shared_document(once[1:], tmp_path / "cleared.html"))
    assert len(mounts) == len(waiting) == S.N_FIGURES - 1 and not drawn
