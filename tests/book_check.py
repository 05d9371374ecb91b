"""The built book opened in headless Chromium: math rendered, plots loaded, nothing fetched
from outside the book.

Run by ``make book-check`` (after ``make book``), not by ``make test``: it needs the built
HTML in book/_build/html and a Chromium binary (Debian: ``apt-get install chromium``; another
binary can be named with the environment variable ``CHROMIUM``).

The pages are served from 127.0.0.1 by a small HTTP server in this process. The browser is
driven through the Chrome DevTools Protocol over a WebSocket (``websocket-client``, which the
Jupyter stack already installs). A screenshot of each page is kept in
book/_build/screenshots/ for a person to look at.
"""
from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

websocket = pytest.importorskip("websocket", reason="websocket-client is needed (pip install websocket-client)")

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "book" / "_build" / "html"
SHOTS = ROOT / "book" / "_build" / "screenshots"
# Two chapters with display math, inline math and matplotlib figures.
PAGES = ["notebooks/02_wkv_as_written.html", "notebooks/05_gpt_mode.html"]
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", "--window-size=1280,1600",
]
TIMEOUT_S = 60


# ----------------------------------------------------------------------------- the site


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture(scope="module")
def site():
    """The built book served on 127.0.0.1 at a free port; yields the base URL."""
    if not (HTML / "index.html").exists():
        pytest.fail(f"{HTML} has no built book: run `make book` first")
    handler = functools.partial(_QuietHandler, directory=str(HTML))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


# ----------------------------------------------------------------------------- the browser


def _chromium() -> str:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    pytest.fail("no Chromium found: install it (Debian: apt-get install -y chromium) "
                "or set CHROMIUM=/path/to/chrome")


class DevTools:
    """A minimal Chrome DevTools Protocol client for one page target."""

    def __init__(self, ws_url: str):
        self.ws = websocket.create_connection(ws_url, timeout=TIMEOUT_S, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params):
        """Send one command and return its result; events that arrive meanwhile are kept."""
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises are awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True,
                           returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self):
        self.ws.close()


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium with a fresh profile; yields the DevTools HTTP endpoint."""
    profile = tempfile.mkdtemp(prefix="rwkv_ref_book_check_")
    process = subprocess.Popen(
        [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + TIMEOUT_S
        while not port_file.exists() or not port_file.read_text().strip():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("Chromium did not start (no DevToolsActivePort file)")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(profile, ignore_errors=True)


def _open_page(endpoint: str) -> DevTools:
    request = urllib.request.Request(f"{endpoint}/json/new?about:blank", method="PUT")
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        target = json.load(response)
    return DevTools(target["webSocketDebuggerUrl"])


# ----------------------------------------------------------------------------- the checks

# Wait for MathJax's first typesetting pass and for every image to finish loading or fail.
_SETTLE = """(async () => {
  for (let i = 0; i < 400 && !(window.MathJax && MathJax.startup && MathJax.startup.promise); i++)
    await new Promise(r => setTimeout(r, 50));
  if (!(window.MathJax && MathJax.startup)) return "MathJax never loaded";
  await MathJax.startup.promise;
  await Promise.all([...document.images].map(im => im.complete ? null :
    new Promise(r => { im.addEventListener('load', r); im.addEventListener('error', r); })));
  return "ok";
})()"""

# What a reader sees: math typeset or not, raw TeX left in the prose, figures and their sizes.
_INSPECT = """(() => {
  const main = document.querySelector('main') || document.body;
  const prose = main.cloneNode(true);
  prose.querySelectorAll('pre, code, mjx-container, script, style').forEach(e => e.remove());
  const text = prose.innerText;
  const mathBoxes = [...main.querySelectorAll('.math')];
  return {
    title: document.title,
    mjx: main.querySelectorAll('mjx-container').length,
    mjxDisplay: main.querySelectorAll('mjx-container[display="true"]').length,
    mathErrors: main.querySelectorAll('mjx-merror').length,
    untypeset: mathBoxes.filter(e => !e.querySelector('mjx-container')).length,
    tooWide: [...main.querySelectorAll('mjx-container[display="true"]')]
      .filter(e => e.scrollWidth > e.clientWidth + 1).length,
    rawTeX: ['$$', '\\\\frac', '\\\\sum', '\\\\[', '\\\\('].filter(s => text.includes(s)),
    images: [...main.querySelectorAll('.cell_output img, img')].map(
      im => ({src: im.currentSrc, width: im.naturalWidth, height: im.naturalHeight})),
  };
})()"""


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_math_and_plots(site, browser, page):
    assert (HTML / page).exists(), f"{page} is not in the built book: run `make book`"
    tab = _open_page(browser)
    try:
        tab.call("Network.enable")
        tab.call("Page.enable")
        tab.call("Emulation.setDeviceMetricsOverride", width=1280, height=1600,
                 deviceScaleFactor=1, mobile=False)
        tab.call("Page.navigate", url=site + page)
        deadline = time.monotonic() + TIMEOUT_S
        while tab.evaluate("document.readyState") != "complete":
            assert time.monotonic() < deadline, f"{page} did not finish loading"
            time.sleep(0.1)
        assert tab.evaluate(_SETTLE) == "ok", "MathJax did not load from the book's _static/"
        seen = tab.evaluate(_INSPECT)

        # a picture for a person: the top of the page and the first figure
        SHOTS.mkdir(parents=True, exist_ok=True)
        stem = Path(page).stem
        _screenshot(tab, SHOTS / f"{stem}_top.png")
        if tab.evaluate("(() => { const im = document.querySelector('main .cell_output img');"
                        " if (!im) return false; im.scrollIntoView({block: 'center'});"
                        " return true; })()"):
            time.sleep(0.2)
            _screenshot(tab, SHOTS / f"{stem}_figure.png")

        requested = [e["params"]["request"]["url"] for e in tab.events
                     if e.get("method") == "Network.requestWillBeSent"]
    finally:
        tab.close()

    assert seen["mjx"] > 0, f"{page}: no math typeset (no mjx-container)"
    assert seen["mjxDisplay"] > 0, f"{page}: no display equation typeset"
    assert seen["mathErrors"] == 0, f"{page}: {seen['mathErrors']} MathJax errors"
    assert seen["untypeset"] == 0, f"{page}: {seen['untypeset']} math blocks left untypeset"
    assert not seen["rawTeX"], f"{page}: raw TeX left in the text: {seen['rawTeX']}"
    assert seen["tooWide"] == 0, f"{page}: {seen['tooWide']} display equations wider than the page"
    figures = [im for im in seen["images"] if "_images/" in im["src"]]
    assert figures, f"{page}: no figure found"
    broken = [im["src"] for im in seen["images"] if im["width"] == 0]
    assert not broken, f"{page}: images that did not load: {broken}"
    outside = [u for u in requested if not u.startswith((site, "data:", "blob:", "about:"))]
    assert not outside, f"{page}: fetched from outside the book: {outside}"


def _screenshot(tab: DevTools, path: Path) -> None:
    data = tab.call("Page.captureScreenshot", format="png")["data"]
    path.write_bytes(base64.b64decode(data))
