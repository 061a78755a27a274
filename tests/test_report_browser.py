"""The page `make demo` writes, opened in headless Chromium: every circuitsvis component mounts, the
flow graphs and tables are there, nothing is requested from the network, and an untrusted prompt
stays text."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.browser import dom_after_scripts, network_requests, parse_dom, require_chromium, screenshot
from tl_backward.report import build_report

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_page(tmp_path_factory):
    """Run demos/run_demo.py (the Makefile's `demo` target) into a temporary file."""
    require_chromium()
    out = tmp_path_factory.mktemp("demo") / "report.html"
    proc = subprocess.run([sys.executable, str(ROOT / "demos" / "run_demo.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith(f"page: {out}")
    return out


@pytest.fixture(scope="module")
def tree(demo_page):
    dom = dom_after_scripts(demo_page, wait_ms=8000)
    return dom, parse_dom(dom)


def _figures(tree):
    return {i: el for i, el in tree.by_id.items() if el["attrs"].get("class") == "tlb-fig"}


@pytest.mark.bridge  # make demo's page: run_demo.py boots a bridge in its own process
def test_circuitsvis_components_mount(demo_page, tree):
    dom, t = tree
    html = demo_page.read_text(encoding="utf-8")
    mounts = re.findall(r'<div class="tlb-cv" id="([^"]+)"', html)
    components = re.findall(r"CircuitsVis\[\"(\w+)\"\]", html)
    assert components == ["AttentionHeads", "AttentionHeads", "ColoredTokensMulti"]
    assert len(mounts) == 3
    heads = re.search(r'"attentionHeadNames":(\[[^\]]*\])', html).group(1).count('"') // 2
    for mount, component in zip(mounts, components):
        el = t.by_id[mount]
        if component == "AttentionHeads":  # a thumbnail canvas per head plus the zoomed one
            assert el["tags"].get("canvas", 0) == heads + 1, (mount, el["tags"])
        else:  # one span per prompt token (6 with BOS) and the layer selector
            assert el["tags"].get("span", 0) >= 6 and el["tags"].get("button", 0) >= 1, el["tags"]
    assert 'class="tlb-error"' not in dom  # no component reported a failure


@pytest.mark.bridge  # make demo's page: run_demo.py boots a bridge in its own process
def test_tables_and_flow_graphs_render(tree):
    dom, t = tree
    figs = _figures(t)
    texts = {i: " ".join(el["text"]) for i, el in figs.items()}
    assert any("What the model predicts" in s and "paris" in s and "rome" in s for s in texts.values())
    lens = [i for i, s in texts.items() if s.startswith("Backward Lens")]
    assert len(lens) == 2 and all(figs[i]["tags"].get("table") == 1 for i in lens)
    flows = [i for i, el in figs.items() if el["tags"].get("svg") and el["tags"].get("rect", 0) > 20]
    assert len(flows) == 2  # forward and backward graph of the most affected layer
    assert figs[flows[0]]["tags"]["rect"] == figs[flows[1]]["tags"]["rect"]  # same components (like=)


@pytest.mark.bridge  # make demo's page: run_demo.py boots a bridge in its own process
def test_page_makes_no_network_request(demo_page):
    assert network_requests(demo_page, wait_ms=8000) == []


@pytest.mark.bridge  # make demo's page: run_demo.py boots a bridge in its own process
def test_screenshot_is_not_blank(demo_page, tmp_path):
    from PIL import Image

    png = screenshot(demo_page, tmp_path / "report.png", (1280, 2400), wait_ms=8000)
    img = Image.open(png).convert("L")
    lo, hi = img.getextrema()
    assert hi - lo > 100  # dark text and coloured cells on a light page
    # The RA heads' thumbnails are drawn on canvases: the page has many distinct grey levels.
    assert len(set(img.resize((320, 600)).getdata())) > 50


def test_untrusted_prompt_stays_text_in_the_browser(gpt2_model, tmp_path):
    require_chromium()
    nasty = "<img src=x onerror=document.documentElement.setAttribute('data-pwned',1)> the cat"
    page = build_report(gpt2_model, nasty, target=" dog", flow=False, heads=2).save(tmp_path / "x.html")
    dom = dom_after_scripts(page)
    t = parse_dom(dom)
    assert t.all_tags.get("img", 0) == 0
    assert "data-pwned" not in re.search(r"<html[^>]*>", dom).group(0)  # the handler never ran
    assert "&lt;img src=x" in dom  # shown as text (title and token chips)
