"""The dashboard in a real headless Chromium (Debian's package; scripts/ensure_chromium.sh
installs it), driven over the DevTools protocol: pages load from file:// with no console error
or uncaught exception, the index lists and sorts the features, feature pages highlight the
firing tokens."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sae.analysis import dashboard, report_html
from sae.analysis.dashboard import display_token
from sae.model import spliced

from . import dashboard_data

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """One headless browser process and a DevTools-protocol connection to it."""

    def __init__(self, binary: str) -> None:
        from websockets.sync.client import connect

        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        self.process = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",  # as root, Chromium refuses to start with its sandbox
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and len(port_file.read_text().split()) == 2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("Chromium did not open its DevTools port")
            time.sleep(0.1)
        port, path = port_file.read_text().split()
        self.socket = connect(f"ws://127.0.0.1:{port}{path}", max_size=None)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.socket.send(json.dumps(message))
        while True:
            reply = json.loads(self.socket.recv(timeout=60))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, session: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event.get("method") == method and event.get("sessionId") == session:
                    self.events.remove(event)
                    return
            reply = json.loads(self.socket.recv(timeout=max(deadline - time.monotonic(), 0.01)))
            self.events.append(reply)

    def open(self, url: str) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})
        page = Page(self, session["sessionId"])
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=page.session)
        self.send("Page.navigate", {"url": url}, session=page.session)
        self.wait_for("Page.loadEventFired", page.session)
        return page

    def close(self) -> None:
        if hasattr(self, "socket"):
            self.socket.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    def __init__(self, browser: Chromium, session: str) -> None:
        self.browser, self.session = browser, session

    def evaluate(self, expression: str) -> Any:
        result = self.browser.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            session=self.session,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads the page reported so far."""
        self.evaluate("0")  # drain events queued before now
        found = []
        for event in self.browser.events:
            if event.get("sessionId") != self.session:
                continue
            params = event.get("params", {})
            method = event.get("method")
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(details.get("exception", {}).get("description", details["text"]))
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append(
                    " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
                )
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(params["entry"]["text"])
        return found


@pytest.fixture(scope="module")
def browser() -> Iterator[Chromium]:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: scripts/ensure_chromium.sh should have installed it")
        pytest.skip("no chromium (run scripts/ensure_chromium.sh)")
    chromium = Chromium(CHROMIUM)
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("dashboard")
    dashboard_data.write_report(dashboard_data.build(), str(output))
    return output


def _document(report: Path) -> dict:
    return json.loads((report / "features.json").read_text())


def test_the_checker_catches_script_errors_console_errors_and_missing_files(browser, tmp_path):
    pages = {
        "throws.html": "<script>undefinedFunction();</script>",
        "logs.html": "<script>console.error('deliberate');</script>",
        "missing.html": '<img src="no-such-plot.png">',
    }
    for name, body in pages.items():
        (tmp_path / name).write_text(f"<!DOCTYPE html><html><body>{body}</body></html>")
    (tmp_path / "clean.html").write_text("<!DOCTYPE html><html><body>fine</body></html>")
    assert any(
        "undefinedFunction" in e for e in browser.open((tmp_path / "throws.html").as_uri()).errors()
    )
    assert any("deliberate" in e for e in browser.open((tmp_path / "logs.html").as_uri()).errors())
    assert browser.open((tmp_path / "missing.html").as_uri()).errors()
    assert browser.open((tmp_path / "clean.html").as_uri()).errors() == []


def test_index_loads_cleanly_and_lists_every_feature(browser, report):
    page = browser.open((report / "index.html").as_uri())
    features = _document(report)["features"]
    assert page.errors() == []
    rows = page.evaluate(
        "[...document.querySelectorAll('#index tbody tr')].map(r => +r.dataset.index)"
    )
    assert rows == [f["index"] for f in features]  # most frequently active first
    tokens = page.evaluate(
        "[...document.querySelectorAll('#index tbody tr')]"
        ".map(r => [...r.querySelectorAll('.tok')].map(t => t.textContent))"
    )
    assert tokens == [[display_token(t) for t in f["top_tokens"]] for f in features]
    assert any(t in dashboard_data.HOSTILE for f in features for t in f["top_tokens"])
    links = page.evaluate("[...document.querySelectorAll('#index tbody a')].map(a => a.href)")
    assert all(Path(link.removeprefix("file://")).exists() for link in links)
    images = page.evaluate("[...document.images].map(i => i.complete && i.naturalWidth > 0)")
    assert images == [True, True]  # density histogram and training curves
    assert page.errors() == []


def test_index_sorts_by_a_clicked_column_and_searches_top_tokens(browser, report):
    page = browser.open((report / "index.html").as_uri())
    features = _document(report)["features"]
    values = "[...document.querySelectorAll('#index tbody tr')].map(r => +r.cells[4].textContent)"
    page.evaluate("document.querySelector('th[data-key=max_activation]').click()")
    descending = page.evaluate(values)
    assert descending == sorted(descending, reverse=True) and len(descending) == len(features)
    page.evaluate("document.querySelector('th[data-key=max_activation]').click()")
    assert page.evaluate(values) == sorted(descending)

    token = features[0]["top_tokens"][0]
    expected = sorted(
        f["index"] for f in features if any(token.lower() in t.lower() for t in f["top_tokens"])
    )
    page.evaluate(
        f"const s = document.getElementById('search'); s.value = {json.dumps(token)};"
        "s.dispatchEvent(new Event('input'));"
    )
    found = page.evaluate(
        "[...document.querySelectorAll('#index tbody tr')].map(r => +r.dataset.index)"
    )
    assert sorted(found) == expected and 0 < len(found) < len(features)
    assert page.errors() == []


def test_index_shows_rows_a_page_at_a_time(browser, report, monkeypatch):
    monkeypatch.setattr(dashboard, "INDEX_PAGE_ROWS", 10)
    features = _document(report)["features"]
    page_file = report / "paged.html"
    page_file.write_text(dashboard.render_index("paged", {}, {}, features, {}))
    page = browser.open(page_file.as_uri())
    rows = "document.querySelectorAll('#index tbody tr').length"
    assert page.evaluate(rows) == 10
    page.evaluate("document.getElementById('more').click()")
    assert page.evaluate(rows) == 20
    assert page.evaluate("document.getElementById('count').textContent") == (
        f"showing 20 of {len(features)} features"
    )
    assert page.errors() == []


def test_an_undefined_ratio_shows_as_undefined_with_its_warning(browser, report):
    """CE loss recovered on text where zero ablation costs nothing: null in the metrics, shown
    as "undefined" on the SAE's page and the overview, each with the warning saying why."""
    sums = spliced.SplicedSums(10, np.array([95.8, 71.9, 97.0]), np.zeros(3))
    metrics = sums.metrics(0)
    warnings = spliced.recovery_warnings(metrics)
    features = _document(report)["features"]
    pages = {
        "undefined.html": dashboard.render_index(
            "far text", {**metrics, "warnings": warnings}, {}, features, {}
        ),
        "overview.html": report_html.render_overview(
            "run", [{"name": "s", "architecture": "topk", **metrics, "warnings": warnings}]
        ),
    }
    for name, html in pages.items():
        (report / name).write_text(html)
        page = browser.open((report / name).as_uri())
        assert page.errors() == []
        shown = page.evaluate("[...document.querySelectorAll('.warning')].map(p => p.textContent)")
        assert len(shown) == 1 and "ce_loss_recovered undefined" in shown[0]
        cells = page.evaluate("[...document.querySelectorAll('td')].map(c => c.textContent)")
        assert "undefined" in cells
        assert "-" in cells or name == "undefined.html"  # the overview's unmeasured columns


def test_feature_page_highlights_the_firing_tokens(browser, report):
    feature = _document(report)["features"][0]
    page = browser.open((report / "features" / f"{feature['index']}.html").as_uri())
    assert page.errors() == []
    contexts = feature["contexts"] + [s for band in feature["quantiles"] for s in band["samples"]]
    expected = [display_token(c["tokens"][c["highlight"]]) for c in contexts]
    shown = page.evaluate("[...document.querySelectorAll('.context .hl')].map(e => e.textContent)")
    assert shown == expected and len(expected) > len(feature["contexts"])
    # The hostile pieces stayed text: no element came from a token.
    assert page.evaluate("document.querySelectorAll('.context script, .context b').length") == 0
    assert page.evaluate("document.querySelectorAll('svg.histogram rect').length") == len(
        feature["histogram"]["counts"]
    )


@pytest.mark.slow
def test_a_real_report_loads_cleanly(browser, local_run):
    from .conftest import SMALL_SAES

    sae_dir = local_run / "report" / SMALL_SAES[1]
    features = json.loads((sae_dir / "features.json").read_text())["features"]
    page = browser.open((sae_dir / "index.html").as_uri())
    assert page.evaluate("document.querySelectorAll('#index tbody tr').length") == len(features)
    assert page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
    assert page.errors() == []
    # The first features carry auto-interp's explanation: in the index and on their page.
    explanations = page.evaluate(
        "[...document.querySelectorAll('#index tbody td.explanation')].map(c => c.textContent)"
    )
    assert explanations == [f.get("explanation") or "" for f in features]
    assert features[0]["explanation"]
    first = browser.open((sae_dir / "features" / f"{features[0]['index']}.html").as_uri())
    assert first.evaluate("document.querySelectorAll('.context .hl').length") > 0
    shown = first.evaluate("document.querySelector('p.explanation').textContent")
    assert shown == features[0]["explanation"]
    assert first.errors() == []
    overview = browser.open((local_run / "report" / "index.html").as_uri())
    assert overview.errors() == []
