"""Headless-Chromium test utility (not package code): load a saved HTML file, let its scripts run,
then read back the DOM, a screenshot, or the network requests the page made.

Uses Debian's ``chromium`` (``.ci/run`` apt-installs it when missing; ``TLB_CHROMIUM`` overrides the
path). Tests call :func:`require_chromium` first, which skips with a clear reason when absent.

Network check: Chromium writes a NetLog (``--log-net-log``) of every URL request any part of the
browser starts, *before* DNS/connect, so an attempted fetch is logged even offline. Requests the
browser makes for itself (component updater, time sync, account probes -- the Debian build does
these despite the flags) carry ``initiator: "not an origin"``; anything else with a network scheme
came from the page. :func:`network_requests` returns those; a positive-control test proves an
``<img>``/``fetch``/``WebSocket`` to the network is detected. DNS is additionally mapped to nothing
(``--host-resolver-rules``) so no test ever reaches the network.
"""

from __future__ import annotations

import html.parser
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

NETWORK_SCHEMES = ("http:", "https:", "ws:", "wss:", "ftp:")
BASE_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--disable-default-apps", "--no-default-browser-check",
    "--mute-audio", "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND",
)


def find_chromium() -> str | None:
    """Path of a Chromium executable, or None. ``TLB_CHROMIUM`` wins, then ``chromium`` on PATH,
    ``/usr/bin/chromium``, ``chromium-browser``."""
    env = os.environ.get("TLB_CHROMIUM")
    if env:
        return env if Path(env).exists() else None
    for cand in ("chromium", "/usr/bin/chromium", "chromium-browser"):
        path = shutil.which(cand)
        if path:
            return path
    return None


def require_chromium() -> str:
    exe = find_chromium()
    if exe is None:
        pytest.skip("headless Chromium not found: install Debian's `chromium` package "
                    "(`apt-get install -y chromium`; .ci/run does this) or set TLB_CHROMIUM")
    return exe


def _run(html_path: str | Path, extra: list[str], *, wait_ms: int, timeout: float = 90) -> str:
    exe = require_chromium()
    url = Path(html_path).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="tlb-chromium-") as profile:
        cmd = [exe, *BASE_FLAGS, f"--user-data-dir={profile}",
               f"--virtual-time-budget={int(wait_ms)}", *extra, url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=profile, env={**os.environ, "HOME": profile})
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout


def dom_after_scripts(html_path: str | Path, *, wait_ms: int = 5000) -> str:
    """The serialised DOM after the page's scripts ran for ``wait_ms`` of virtual time."""
    dom = _run(html_path, ["--dump-dom"], wait_ms=wait_ms)
    if "<html" not in dom:
        raise RuntimeError(f"chromium returned no DOM for {html_path}")
    return dom


def screenshot(html_path: str | Path, png_path: str | Path, size: tuple[int, int] = (1200, 900),
               *, wait_ms: int = 5000) -> Path:
    """Render the page at ``size`` (w, h) CSS pixels into ``png_path``; returns the Path."""
    png = Path(png_path).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    _run(html_path, [f"--screenshot={png}", f"--window-size={size[0]},{size[1]}"], wait_ms=wait_ms)
    if not png.exists() or png.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot for {html_path}")
    return png


def network_requests(html_path: str | Path, *, wait_ms: int = 5000) -> list[str]:
    """URLs with a network scheme that the *page* (not the browser itself) asked for."""
    with tempfile.TemporaryDirectory(prefix="tlb-netlog-") as d:
        log = Path(d) / "net.json"
        _run(html_path, ["--dump-dom", f"--log-net-log={log}"], wait_ms=wait_ms)
        text = log.read_text(encoding="utf-8", errors="replace")
    return page_requests_from_netlog(text)


def page_requests_from_netlog(text: str) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:  # log cut short at exit: close it like Chromium's viewer does
        data = json.loads(text.rstrip().rstrip(",") + "]}")
    names = {v: k for k, v in data["constants"]["logEventTypes"].items()}
    browser_sources, urls_by_source = set(), {}
    for ev in data.get("events", []):
        params = ev.get("params") or {}
        url = params.get("url")
        if not isinstance(url, str):
            continue
        src = ev["source"]["id"]
        urls_by_source.setdefault(src, set()).add(url)
        if names.get(ev["type"]) == "URL_REQUEST_START_JOB" and params.get("initiator") == "not an origin":
            browser_sources.add(src)
    browser_urls = {u for s in browser_sources for u in urls_by_source[s]}
    found = {u for s, us in urls_by_source.items() if s not in browser_sources for u in us
             if u.lower().startswith(NETWORK_SCHEMES) and u not in browser_urls}
    return sorted(found)


class _Tree(html.parser.HTMLParser):
    """Minimal DOM reader: per element id, its tag counts and text inside; all tags overall."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
            "track", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, str | None]] = []
        self.by_id: dict[str, dict] = {}
        self.all_tags: dict[str, int] = {}

    def _open_ids(self):
        return [i for _, i in self.stack if i is not None]

    def handle_starttag(self, tag, attrs):
        self.all_tags[tag] = self.all_tags.get(tag, 0) + 1
        for i in self._open_ids():
            tags = self.by_id[i]["tags"]
            tags[tag] = tags.get(tag, 0) + 1
        el_id = dict(attrs).get("id")
        if el_id is not None:
            self.by_id[el_id] = {"tags": {}, "text": [], "attrs": dict(attrs), "tag": tag}
        if tag not in self.VOID:
            self.stack.append((tag, el_id))

    def handle_endtag(self, tag):
        for k in range(len(self.stack) - 1, -1, -1):
            if self.stack[k][0] == tag:
                del self.stack[k:]
                break

    def handle_data(self, data):
        if self.stack and self.stack[-1][0] in ("script", "style"):
            return
        for i in self._open_ids():
            self.by_id[i]["text"].append(data)


def parse_dom(dom: str) -> _Tree:
    """Parse a dumped DOM: ``.by_id[id] -> {"tags": {tag: count inside}, "text": [...], "attrs"}``,
    ``.all_tags -> {tag: count}``."""
    tree = _Tree()
    tree.feed(dom)
    tree.close()
    return tree
