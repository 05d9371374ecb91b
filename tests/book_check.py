"""The built book as a reader sees it: every page opened in headless Chromium at 1280 px.

Run by ``make book-check`` (after ``make book``), not by ``make test``: it needs the built HTML
in book/_build/html and a Chromium binary (Debian: ``apt-get install -y chromium``; another
binary can be named with the environment variable ``CHROMIUM``).

Every page of book/_toc.yml (chapters, solutions, the teacher's pages, the appendix) is
visited once; each property below is then its own test, so a failure names the page and the
property:

* no console error, uncaught exception or failed request (a 404 is one);
* math rendered: no ``.math`` element without MathJax output, no MathJax error, no raw TeX
  (``$$``, ``\\(``, ``\\frac`` ...) left in the prose;
* at most one MathJax script per page (the bundle ``tex-chtml.js``), exactly one where there is
  math, and no other MathJax file fetched (an extension MathJax would autoload is a failure);
* every image loaded (none with zero natural width);
* nothing requested from outside the book (no CDN, no fonts, no analytics);
* no code block, output or equation wider than its box at 1280 px (nothing scrolls sideways);
* no absolute path of the build machine (/tmp/, /work/, /root/, /home/) in the page's text;
* one search field in the page's chrome (the theme can draw two).

Two more checks need no browser: every link between the book's own pages resolves to a built
file, and every matplotlib figure was saved at 110 dpi or more (the PNG's pHYs chunk).

The pages are served from 127.0.0.1 by a small HTTP server in this process; the browser is
driven through the Chrome DevTools Protocol over a WebSocket (``websocket-client``). A
screenshot of the top of each page is kept in book/_build/screenshots/ for a person to look at.
"""
from __future__ import annotations

import base64
import functools
import html.parser
import http.server
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

websocket = pytest.importorskip("websocket", reason="websocket-client is needed "
                                "(pip install websocket-client)")

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
HTML = BOOK / "_build" / "html"
SHOTS = BOOK / "_build" / "screenshots"
WIDTH, HEIGHT = 1280, 1000
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
    f"--window-size={WIDTH},{HEIGHT}",
]
TIMEOUT_S = 60
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:tmp|work|root|home)/")
RAW_TEX = re.compile(r"\$\$|\\\(|\\\)|\\\[|\\\]|\\(?:frac|sum|mathrm|text|left|right|begin|"
                     r"cdot|exp|max|le|ge|odot|oplus)\b")
MIN_DPI = 110


def toc_pages() -> list[str]:
    """The built page of every document in book/_toc.yml, root first, e.g. 'intro.html'."""
    toc = yaml.safe_load((BOOK / "_toc.yml").read_text())
    files = [toc["root"]] + [entry["file"] for part in toc["parts"]
                             for entry in part["chapters"]]
    return [f"{name}.html" for name in files]


PAGES = toc_pages()


# ----------------------------------------------------------------------------- the site


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture(scope="session")
def site():
    """The built book served on 127.0.0.1 at a free port; yields the base URL."""
    if not (HTML / "index.html").exists():
        pytest.fail(f"{HTML.relative_to(ROOT)} has no built book: run `make book` first")
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

    def of(self, method: str) -> list[dict]:
        """The parameters of every event of one kind received so far."""
        return [e["params"] for e in self.events if e.get("method") == method]

    def close(self):
        self.ws.close()


@pytest.fixture(scope="session")
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
        yield f"http://127.0.0.1:{int(port_file.read_text().split()[0])}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(profile, ignore_errors=True)


def _open_tab(endpoint: str) -> DevTools:
    request = urllib.request.Request(f"{endpoint}/json/new?about:blank", method="PUT")
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        return DevTools(json.load(response)["webSocketDebuggerUrl"])


# ----------------------------------------------------------------------------- one visit

# Wait for MathJax's first typesetting pass (where the page loads it) and for every image to
# finish loading or fail.
_SETTLE = """(async () => {
  if (document.querySelector('script[src*="mathjax" i]')) {
    for (let i = 0; i < 400 && !(window.MathJax && MathJax.startup && MathJax.startup.promise); i++)
      await new Promise(r => setTimeout(r, 50));
    if (!(window.MathJax && MathJax.startup)) return "MathJax never started";
    await MathJax.startup.promise;
  }
  await Promise.all([...document.images].map(im => im.complete ? null :
    new Promise(r => { im.addEventListener('load', r); im.addEventListener('error', r); })));
  await new Promise(r => setTimeout(r, 200));   // web fonts and late requests
  return "ok";
})()"""

# What a reader sees. Folded cells (<details>) are opened first so that their code is measured.
_INSPECT = """(() => {
  document.querySelectorAll('details').forEach(d => d.open = true);
  const main = document.querySelector('main') || document.body;
  const prose = main.cloneNode(true);
  prose.querySelectorAll('pre, code, mjx-container, script, style, .math').forEach(e => e.remove());
  const visible = e => !!(e.offsetWidth || e.offsetHeight || e.getClientRects().length);
  const wide = e => visible(e) && e.scrollWidth > e.clientWidth + 1;
  const describe = e => (e.className || e.tagName) + ': ' + (e.textContent || '').trim().slice(0, 60);
  return {
    mathBoxes: main.querySelectorAll('.math').length,
    untypeset: [...main.querySelectorAll('.math')].filter(e => !e.querySelector('mjx-container'))
      .map(e => e.textContent.trim().slice(0, 60)),
    mathErrors: [...main.querySelectorAll('mjx-merror')].map(e => e.textContent.slice(0, 60)),
    prose: prose.textContent,
    text: document.body.textContent,
    mathjaxScripts: [...document.querySelectorAll('script[src]')].map(s => s.src)
      .filter(s => /mathjax|tex-(chtml|svg|mml)/i.test(s)),
    images: [...document.images].map(im => ({src: im.currentSrc || im.src, width: im.naturalWidth})),
    tooWide: [...main.querySelectorAll('pre, div.highlight, div.cell_output, mjx-container[display="true"], table')]
      .filter(wide).map(describe),
    pageWidth: document.documentElement.scrollWidth,
    searchFields: [...document.querySelectorAll('.search-button-field, .bd-search, form[role=search]')]
      .filter(visible).length,
  };
})()"""

_VISITS: dict[str, dict] = {}


def visit(site: str, browser: str, page: str) -> dict:
    """Open one page once (later calls reuse the result) and return what was seen."""
    if page not in _VISITS:
        if not (HTML / page).exists():
            pytest.fail(f"{page} is not in the built book: run `make book`")
        _VISITS[page] = _load(site, browser, page)
    return _VISITS[page]


def _load(site: str, browser: str, page: str) -> dict:
    tab = _open_tab(browser)
    try:
        for domain in ("Network", "Page", "Runtime", "Log"):
            tab.call(f"{domain}.enable")
        tab.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT,
                 deviceScaleFactor=1, mobile=False)
        tab.call("Page.navigate", url=site + page)
        deadline = time.monotonic() + TIMEOUT_S
        while tab.evaluate("document.readyState") != "complete":
            assert time.monotonic() < deadline, f"{page} did not finish loading"
            time.sleep(0.1)
        settled = tab.evaluate(_SETTLE)
        SHOTS.mkdir(parents=True, exist_ok=True)
        shot = tab.call("Page.captureScreenshot", format="png")["data"]
        (SHOTS / f"{page.replace('/', '__')[:-5]}.png").write_bytes(base64.b64decode(shot))
        seen = tab.evaluate(_INSPECT)
        tab.call("Runtime.evaluate", expression="0")      # collect the last events
    finally:
        tab.close()
    seen["settled"] = settled
    seen["requests"] = [e["request"]["url"] for e in tab.of("Network.requestWillBeSent")]
    status = {e["requestId"]: (e["response"]["status"], e["response"]["url"])
              for e in tab.of("Network.responseReceived")}
    seen["errors"] = (
        [f"console.{e['type']}: " + " ".join(str(a.get("value", a.get("description", "")))
                                             for a in e["args"])
         for e in tab.of("Runtime.consoleAPICalled") if e["type"] in ("error", "assert")]
        + [f"exception: {e['exceptionDetails'].get('exception', {}).get('description', e)}"
           for e in tab.of("Runtime.exceptionThrown")]
        + [f"log {e['entry']['source']}: {e['entry']['text']} {e['entry'].get('url', '')}"
           for e in tab.of("Log.entryAdded") if e["entry"]["level"] == "error"]
        + [f"HTTP {code}: {url}" for code, url in status.values() if code >= 400]
        + [f"failed request: {e.get('errorText')} ({e['requestId']})"
           for e in tab.of("Network.loadingFailed") if not e.get("canceled")])
    return seen


# ----------------------------------------------------------------------------- the checks

page_param = pytest.mark.parametrize("page", PAGES)


@page_param
def test_no_console_errors(site, browser, page):
    seen = visit(site, browser, page)
    assert seen["settled"] == "ok", f"{page}: {seen['settled']}"
    assert not seen["errors"], f"{page}: " + "\n".join(seen["errors"])


@page_param
def test_math_is_rendered(site, browser, page):
    seen = visit(site, browser, page)
    assert not seen["untypeset"], f"{page}: math without MathJax output: {seen['untypeset']}"
    assert not seen["mathErrors"], f"{page}: MathJax errors: {seen['mathErrors']}"
    raw = sorted(set(RAW_TEX.findall(seen["prose"])))
    assert not raw, f"{page}: raw TeX left in the text: {raw}"


@page_param
def test_one_mathjax_script(site, browser, page):
    seen = visit(site, browser, page)
    scripts = seen["mathjaxScripts"]
    assert len(scripts) <= 1, f"{page}: {len(scripts)} MathJax scripts: {scripts}"
    if seen["mathBoxes"]:
        assert len(scripts) == 1, f"{page} has math but loads no MathJax"
    fetched = [u for u in seen["requests"] if "mathjax" in u.lower() and u.endswith(".js")]
    assert len(fetched) <= 1, f"{page}: MathJax fetched more scripts: {fetched}"


@page_param
def test_images_load(site, browser, page):
    seen = visit(site, browser, page)
    broken = [im["src"] for im in seen["images"] if im["width"] == 0]
    assert not broken, f"{page}: images that did not load: {broken}"


@page_param
def test_nothing_fetched_from_outside(site, browser, page):
    seen = visit(site, browser, page)
    outside = [u for u in seen["requests"] if not u.startswith((site, "data:", "blob:"))]
    assert not outside, f"{page}: fetched from outside the book: {outside}"


@page_param
def test_code_fits_the_page(site, browser, page):
    seen = visit(site, browser, page)
    assert not seen["tooWide"], f"{page}: wider than its box at {WIDTH} px: {seen['tooWide']}"
    assert seen["pageWidth"] <= WIDTH, f"{page} scrolls sideways ({seen['pageWidth']} px)"


@page_param
def test_no_build_machine_paths(site, browser, page):
    seen = visit(site, browser, page)
    hits = [seen["text"][max(0, m.start() - 40):m.end() + 40].replace("\n", " ")
            for m in MACHINE_PATH.finditer(seen["text"])]
    assert not hits, f"{page}: absolute paths of the build machine: {hits[:5]}"


@page_param
def test_one_search_field(site, browser, page):
    seen = visit(site, browser, page)
    assert seen["searchFields"] <= 1, f"{page}: {seen['searchFields']} search fields shown"


# ----------------------------------------------------------------------------- no browser


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in ("a", "link", "img", "script"):
            for name, value in attrs:
                if name in ("href", "src") and value:
                    self.hrefs.append(value)


@page_param
def test_links_resolve(page):
    path = HTML / page
    if not path.exists():
        pytest.fail(f"{page} is not in the built book: run `make book`")
    parser = _Links()
    parser.feed(path.read_text())
    missing = []
    for href in parser.hrefs:
        parts = urllib.parse.urlsplit(href)
        if parts.scheme or parts.netloc or not parts.path:
            continue                              # external links, data:, or "#anchor"
        target = (path.parent / urllib.parse.unquote(parts.path)).resolve()
        if not target.exists():
            missing.append(href)
    assert not missing, f"{page}: links to files that were not built: {missing}"


def png_dpi(data: bytes) -> float | None:
    """The horizontal resolution in dots per inch from a PNG's pHYs chunk (None if absent)."""
    at = 8                                        # after the PNG signature
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        if kind == b"pHYs":
            x, _, unit = struct.unpack(">IIB", data[at + 8:at + 17])
            return x * 0.0254 if unit == 1 else None
        at += 12 + length
    return None


def test_figures_are_drawn_at_book_resolution():
    images = [p for p in (HTML / "_images").glob("*.png") if b"matplotlib" in p.read_bytes()]
    if not images:
        pytest.fail("no matplotlib figure in the built book: run `make book`")
    low = {p.name: png_dpi(p.read_bytes()) for p in images}
    low = {name: dpi for name, dpi in low.items() if dpi is None or dpi < MIN_DPI - 0.5}
    assert not low, f"figures below {MIN_DPI} dpi (book/matplotlibrc sets it): {low}"
