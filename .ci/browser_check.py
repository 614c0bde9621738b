#!/usr/bin/env python3
"""Open every page of the book's table of contents in headless Chromium and check what a reader sees.

    python .ci/browser_check.py _build/smoke/_build/html --screenshots _build/screenshots

The built site is served on a free localhost port for the length of the check; one Chromium (Debian's
package, driven by Playwright) opens the pages one after another. Per page:

- its title: an ``<h1>`` in the article, first on the page, the notebook's (or Markdown file's) first
  heading, and contained in the ``<title>``;
- no error output: no cell output that MyST-NB marks as a traceback, and no stderr output showing
  a Python error (other stderr, such as a warning, is printed as a note);
- every ``<img>`` loads (``decode()`` succeeds, ``naturalWidth > 0``), and no file of the site
  answers with an error status;
- every formula typeset: each ``.math`` element holds an ``mjx-container`` and no ``mjx-merror``,
  and no raw TeX (``\\(...\\)``, ``\\[...\\]``, ``$$...$$``, ``$...$`` with a command, ``^`` or ``_``)
  is left in the visible text outside code;
- the launch and repository links follow ``_config.yml``: the repository button names
  ``repository: url:``, the issues button starts with it, and a notebook page's Colab link is
  ``<colab_url>/github/<owner>/<name>/blob/<branch>/<path>.ipynb``;
- no JavaScript error.

Then ``index.html`` must lead to the root page, and ``search.html?q=<term>`` must list at least one page
of the table of contents. Requests to other hosts are blocked (the site must work offline) and
printed as notes. Screenshots of the root page, two chapters and (up to five) pages with problems
go to ``--screenshots``.

Exit code 0: every check passed; 1: problems (printed, each naming its page); 2: set-up failed;
3: NOT RUN, because Chromium is not installed and cannot be installed here (no apt-get, no root or
sudo, or the installation failed): the reason is printed on a line that starts with ``NOT RUN:``.

The set-up (:func:`prepare`) takes ``chromium`` from PATH (or ``$FEDLORA_CHROMIUM``), else installs
Debian's package with ``apt-get install -y --no-install-recommends chromium`` (``apt-get update``
first only when the install fails for missing package lists; through ``sudo -n`` when not root),
and installs the ``playwright`` package pinned in constraints.txt when it is missing.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
"""What :func:`find_chromium` looks for on PATH, in this order (Debian's package first)."""
DEFAULT_SEARCH = "FedSA-LoRA"
NOT_RUN_EXIT = 3
PAGE_TIMEOUT_MS = 30_000
VIEWPORT = {"width": 1280, "height": 900}
PROBLEM_SCREENSHOTS = 5
KNOWN_JS_ERRORS = {
    "Identifier 'THEBE_JS_URL' has already been declared":
        "sphinx-thebe 0.3.1 adds its inline settings at env-before-read-docs, which can run twice in one build; "
        "the first copy defines them and the book has no live-code button",
}
"""JavaScript errors of the toolchain that change nothing a reader sees: printed as notes, not problems."""


def say(message: str) -> None:
    print(f"[browser] {message}", flush=True)


# --- set-up -------------------------------------------------------------------------------------


def _runs(executable: str) -> bool:
    """True when ``executable --version`` exits 0 (a snap stub or broken install does not)."""
    try:
        result = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def find_chromium() -> str | None:
    """The Chromium to drive: ``$FEDLORA_CHROMIUM``, else the first of :data:`CHROMIUM_NAMES` on PATH that runs."""
    chosen = os.environ.get("FEDLORA_CHROMIUM")
    candidates = [chosen] if chosen else [shutil.which(name) for name in CHROMIUM_NAMES]
    for candidate in candidates:
        if candidate and _runs(candidate):
            return candidate
    return None


def install_chromium() -> tuple[str | None, str]:
    """Install Debian's ``chromium`` with apt-get; (its path, "") or (None, why it could not be installed)."""
    apt = shutil.which("apt-get")
    if apt is None:
        return None, "Chromium is not installed and there is no apt-get to install it"
    prefix: list[str] = []
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        sudo = shutil.which("sudo")
        if sudo is None:
            return None, "Chromium is not installed, and installing it needs root (not root, no sudo)"
        prefix = [sudo, "-n"]  # never wait for a password
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*prefix, apt, "install", "-y", "--no-install-recommends", "chromium"]

    def attempt(cmd: list[str]) -> subprocess.CompletedProcess:
        say("$ " + " ".join(cmd))
        try:
            return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, check=False)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(cmd, 124, "", "timed out after 20 minutes")

    result = attempt(install)
    if result.returncode != 0 and re.search(r"Unable to locate package|has no installation candidate|"
                                            r"Failed to fetch|404\s+Not Found", result.stderr + result.stdout):
        update = attempt([*prefix, apt, "update"])
        if update.returncode == 0:
            result = attempt(install)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        return None, f"apt-get could not install chromium (exit {result.returncode}): {' / '.join(tail)}"
    found = find_chromium()
    if found is None:
        return None, "apt-get installed chromium, but no chromium on PATH runs"
    return found, ""


def ensure_playwright() -> None:
    """Install the ``playwright`` package pinned in constraints.txt into this interpreter's environment if missing."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        cmd = [sys.executable, "-m", "pip", "install", "-c", str(ROOT / "constraints.txt"), "playwright"]
        say("$ " + " ".join(cmd))
        subprocess.run(cmd, check=True)


def prepare() -> tuple[str | None, str]:
    """Chromium's path and playwright installed, or (None, why Chromium cannot be had: the check is NOT RUN).

    A failing playwright installation raises (``subprocess.CalledProcessError``): the project pins
    playwright, so its absence is a broken environment, not a reason to skip the check.
    """
    with _install_lock():  # two pytest workers, or two checks, must not run apt-get or pip at once
        chromium = find_chromium()
        why = ""
        if chromium is None and os.environ.get("FEDLORA_CHROMIUM"):
            why = f"$FEDLORA_CHROMIUM ({os.environ['FEDLORA_CHROMIUM']}) does not run"
        elif chromium is None:
            say("no Chromium on PATH: installing Debian's package")
            chromium, why = install_chromium()
        if chromium is not None:
            ensure_playwright()
    return chromium, why


@contextmanager
def _install_lock() -> Iterator[None]:
    """An exclusive lock on a file in the temporary folder (none where fcntl is missing, as on Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(Path(tempfile.gettempdir()) / "fedlora-browser-setup.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- what to open ---------------------------------------------------------------------------------


def toc_pages(toc: Path) -> list[str]:
    """The pages of a Jupyter Book 1.x ``_toc.yml``, root first, as paths without suffix (``book/intro``)."""
    import yaml

    data = yaml.safe_load(toc.read_text(encoding="utf-8"))
    pages = [str(data["root"])]

    def walk(entries: list[dict]) -> None:
        for entry in entries or []:
            if "file" in entry:
                pages.append(str(entry["file"]))
            if "glob" in entry:
                raise ValueError(f"{toc}: glob entries are not supported by the browser check ({entry['glob']})")
            walk(entry.get("sections", []))

    for part in data.get("parts", []):
        walk(part.get("chapters", []))
    walk(data.get("chapters", []))
    walk(data.get("sections", []))
    return [re.sub(r"\.(ipynb|md|rst)$", "", page) for page in pages]


@dataclass
class Links:
    """Where the launch and repository links must point (``_config.yml``)."""

    repository: str
    branch: str = "main"
    colab: str = "https://colab.research.google.com"
    checkout: Path | None = None
    """The repository's files: a Colab link to another notebook must name one of them (None: not checked)."""

    def colab_prefix(self) -> str:
        """How every Colab link to a notebook of the repository starts."""
        repo = urlsplit(self.repository).path.strip("/")
        return f"{self.colab.rstrip('/')}/github/{repo}/blob/{self.branch}/"

    def colab_link(self, page: str) -> str:
        """The Colab launch link of the notebook ``page`` (path without suffix)."""
        return f"{self.colab_prefix()}{page}.ipynb"

    @classmethod
    def from_config(cls, config: Path) -> Links:
        import yaml

        data = yaml.safe_load(config.read_text(encoding="utf-8"))
        repository = data.get("repository") or {}
        if not repository.get("url"):
            raise ValueError(f"{config} has no repository: url:")
        colab = (data.get("launch_buttons") or {}).get("colab_url") or cls.colab
        return cls(str(repository["url"]).rstrip("/"), str(repository.get("branch") or "main"), str(colab),
                   config.resolve().parent)


_HEADING = re.compile(r"^#\s+(.+?)\s*#*\s*$", re.MULTILINE)


def source_title(html: Path, page: str) -> str | None:
    """The first level-1 heading of the page's source as Sphinx keeps it (``_sources/``), or None."""
    notebook = html / "_sources" / f"{page}.ipynb"
    text = ""
    if notebook.is_file():
        cells = json.loads(notebook.read_text(encoding="utf-8")).get("cells", [])
        text = "\n".join("".join(cell.get("source", [])) for cell in cells if cell.get("cell_type") == "markdown")
    else:
        for suffix in (".md", ".md.txt"):
            if (html / "_sources" / f"{page}{suffix}").is_file():
                text = (html / "_sources" / f"{page}{suffix}").read_text(encoding="utf-8")
                text = re.sub(r"\A---\n.*?\n---\n", "", text, flags=re.DOTALL)  # front matter
                break
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.MULTILINE | re.DOTALL)  # fenced code
    match = _HEADING.search(text)
    return match.group(1) if match else None


def plain(text: str) -> str:
    """A heading's words for comparison: Markdown markup, smart quotes and dashes and spacing undone."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[*_`]", "", text)
    for fancy, simple in (("\u2019", "'"), ("\u2018", "'"), ("\u201c", '"'), ("\u201d", '"'),
                          ("\u2014", "---"), ("\u2013", "--"), ("\u00a0", " ")):
        text = text.replace(fancy, simple)
    return " ".join(text.split())


# --- serving --------------------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        pass


@contextmanager
def serve(folder: Path) -> Iterator[str]:
    """Serve ``folder`` on a free localhost port in a thread; yields the base URL; always shut down."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="site-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# --- the checks in the page -----------------------------------------------------------------------

# Runs in the page after "load"; returns what Python judges. Kept free of any decision about
# what counts as a problem, except for the TeX patterns, which need the text nodes.
_INSPECT = r"""
async () => {
  const text = (el) => (el.textContent || '').replace(/\s+/g, ' ').trim();
  const out = {};
  // title
  const article = document.querySelector('article') || document.querySelector('main') || document.body;
  const h1 = article.querySelector('h1');
  out.title = document.title;
  out.h1 = null;
  out.before_h1 = [];
  if (h1) {
    const copy = h1.cloneNode(true);
    copy.querySelectorAll('.headerlink').forEach((a) => a.remove());
    out.h1 = text(copy);
    for (const el of article.querySelectorAll('*')) {
      if (el === h1) break;
      if (el.contains(h1) || el.children.length) continue;
      const visible = el.getClientRects().length > 0 && getComputedStyle(el).visibility !== 'hidden';
      if (visible && text(el)) out.before_h1.push(text(el).slice(0, 80));
    }
  }
  // outputs
  out.tracebacks = [...document.querySelectorAll('.output.traceback, .output.error')]
    .map((el) => text(el).slice(0, 300));
  out.stderr = [...document.querySelectorAll('.output.stderr')].map((el) => (el.textContent || '').slice(0, 2000));
  out.streams = [...document.querySelectorAll('.output.stream')]
    .map((el) => el.textContent || '').filter((t) => t.includes('Traceback (most recent call last)'))
    .map((t) => t.slice(0, 300));
  // images
  const images = [...document.images];
  images.forEach((img) => { img.loading = 'eager'; });
  out.images = await Promise.all(images.map(async (img) => {
    const src = img.getAttribute('src') || '';
    let decoded = true;
    try {
      const late = new Promise((_, reject) => setTimeout(() => reject(new Error('timeout')), 15000));
      await Promise.race([img.decode(), late]);
    } catch (error) { decoded = false; }
    const svg = /\.svg(\?|#|$)/i.test(src) || img.currentSrc.startsWith('data:image/svg');
    return {src, decoded, width: img.naturalWidth, svg};
  }));
  // formulas
  const maths = [...document.querySelectorAll('.math')];
  out.math_count = maths.length;
  out.mathjax = null;
  const script = document.querySelector('script[src*="mathjax" i]');
  if (maths.length && !script) out.mathjax = 'is not on the page';
  if (script) {
    // After "load" the deferred MathJax script has run (or failed to load): a short grace period only.
    const started = Date.now();
    const loaded = () => window.MathJax && window.MathJax.startup && window.MathJax.startup.promise;
    while (!loaded() && Date.now() - started < 5000) {
      await new Promise((r) => setTimeout(r, 100));
    }
    if (loaded()) {
      try {
        await window.MathJax.startup.promise;
        out.mathjax = 'ready';
      } catch (error) {
        out.mathjax = 'failed: ' + error;
      }
    } else {
      out.mathjax = 'not loaded';
    }
  }
  out.untypeset = maths.filter((el) => !el.querySelector('mjx-container')).map((el) => text(el).slice(0, 100));
  out.merrors = [...document.querySelectorAll('mjx-merror')]
    .map((el) => el.getAttribute('data-mjx-error') || text(el)).map((t) => t.slice(0, 120));
  const skip = 'script, style, pre, code, textarea, mjx-container, .highlight, .math';
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const blocks = new Map();  // the text of each block (paragraph, list item, cell), so no match spans two
  const block = 'p, li, td, th, dt, dd, h1, h2, h3, h4, h5, h6, figcaption, caption, div, section, body';
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (!node.parentElement || node.parentElement.closest(skip)) continue;
    const owner = node.parentElement.closest(block);
    blocks.set(owner, (blocks.get(owner) || '') + node.nodeValue);
  }
  const visibleText = [...blocks.values()].map((t) => t.replace(/\s+/g, ' ')).join('\n');
  // \( \), \[ \], $$ $$, and $ $ around a TeX command, ^ or _ (so that "$5 and $10" is left alone)
  const patterns = [/\\\(.+?\\\)/g, /\\\[.+?\\\]/g, /\$\$.+?\$\$/g,
                    /(?<![\w$])\$(?!\s)[^$\n]*?(?:\\[A-Za-z]+|[\^_])[^$\n]*?\$(?![\w$])/g];
  out.raw_tex = [];
  for (const pattern of patterns) {
    for (const match of visibleText.matchAll(pattern)) out.raw_tex.push(match[0].replace(/\s+/g, ' ').slice(0, 100));
  }
  // links
  out.links = [...document.querySelectorAll('a[href]')].map((a) => a.href);
  return out;
}
"""


@dataclass
class Report:
    """What the check found: ``problems`` (empty: passed), each naming its page, and ``notes``."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pages: list[str] = field(default_factory=list)
    screenshots: list[Path] = field(default_factory=list)
    seconds: float = 0.0


_ERROR_LINE = re.compile(r"Traceback \(most recent call last\)|^\w*(Error|Exception): ", re.MULTILINE)


def judge_page(page: str, found: dict, links: Links | None, expected_title: str | None, notebook: bool) -> tuple[
        list[str], list[str]]:
    """The problems and notes of one page from what :data:`_INSPECT` found there."""
    where = f"{page}.html"
    problems: list[str] = []
    notes: list[str] = []
    h1 = found["h1"]
    if not h1:
        problems.append(f"{where}: no <h1> title in the article")
    else:
        if h1 not in found["title"]:
            problems.append(f"{where}: the <title> {found['title']!r} does not contain the h1 {h1!r}")
        if expected_title is not None and "$" not in expected_title and plain(h1) != plain(expected_title):
            problems.append(f"{where}: the h1 {h1!r} is not the source's first heading {expected_title!r}")
        if found["before_h1"]:
            problems.append(f"{where}: shown above the title: {found['before_h1'][:3]}")
    for trace in found["tracebacks"]:
        problems.append(f"{where}: error output: {re.sub(r'-{10,}', '', trace).strip()[:200]}")
    for stderr in found["stderr"]:
        if _ERROR_LINE.search(stderr):
            problems.append(f"{where}: error in a stderr output: {' '.join(stderr.split())[:200]}")
        else:
            notes.append(f"{where}: stderr output shown: {' '.join(stderr.split())[:160]}")
    for stream in found["streams"]:
        problems.append(f"{where}: a traceback printed in an output: {' '.join(stream.split())[:200]}")
    for image in found["images"]:
        if not image["decoded"] or (image["width"] == 0 and not image["svg"]):
            problems.append(f"{where}: image does not load: {image['src'] or '(no src)'}")
    if found["mathjax"] not in (None, "ready"):
        problems.append(f"{where}: MathJax {found['mathjax']} ({found['math_count']} formulas on the page)")
    if found["untypeset"]:
        shown = "; ".join(found["untypeset"][:3])
        problems.append(f"{where}: {len(found['untypeset'])} formula(s) not typeset, e.g. {shown}")
    for error in found["merrors"][:5]:
        problems.append(f"{where}: TeX error in a formula: {error}")
    for raw in found["raw_tex"][:5]:
        problems.append(f"{where}: raw TeX in the text (not typeset): {raw}")
    if links is not None:
        hrefs = [href.rstrip("/") for href in found["links"]]
        if links.repository not in hrefs:
            problems.append(f"{where}: no link to the repository {links.repository}")
        for href in hrefs:
            if "/issues/new" in href and not href.startswith(links.repository + "/issues/new"):
                problems.append(f"{where}: the issues link {href} is not under {links.repository}")
        # The launch button opens this page's notebook; the text may link other notebooks of the
        # repository in Colab (the exercises' handouts), which must exist there.
        colab = [href for href in hrefs if href.startswith(links.colab.rstrip("/") + "/")]
        wanted = links.colab_link(page)
        prefix = links.colab_prefix()
        for href in colab:
            if not href.startswith(prefix):
                problems.append(f"{where}: the Colab link {href} does not start with {prefix}")
            elif links.checkout is not None and not (links.checkout / href[len(prefix):].split("#")[0]).is_file():
                problems.append(f"{where}: the Colab link {href} names a file that is not in the repository")
        if notebook and wanted not in colab:
            problems.append(f"{where}: no Colab launch link {wanted}")
    return problems, notes


def check_site(html: Path, chromium: str, pages: list[str], links: Links | None = None,
               search: str | None = DEFAULT_SEARCH, screenshots: Path | None = None,
               screenshot_pages: list[str] | None = None) -> Report:
    """Open ``pages`` (paths without ``.html``, the root first) of the site in ``html`` in headless Chromium.

    ``links``: where the launch and repository links must point (None: not checked); ``search``: a
    term that ``search.html`` must find (None: not checked); ``screenshot_pages``: which pages to
    photograph into ``screenshots`` (default: the root and two chapters).
    """
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    started = time.monotonic()
    html = Path(html).resolve()
    report = Report(pages=list(pages))
    if screenshot_pages is None:
        screenshot_pages = list(dict.fromkeys([pages[0], *pages[1:2], *pages[len(pages) // 2:len(pages) // 2 + 1]]))
    if screenshots is not None:
        screenshots.mkdir(parents=True, exist_ok=True)
        for old in screenshots.glob("*.png"):  # from an earlier check
            old.unlink()

    with serve(html) as base, sync_playwright() as playwright:
        origin = base.rstrip("/")
        browser = playwright.chromium.launch(executable_path=chromium, headless=True,
                                             args=["--disable-dev-shm-usage", "--disable-gpu"])
        try:
            context = browser.new_context(viewport=VIEWPORT)
            blocked: dict[str, list[str]] = {}
            known: dict[str, list[str]] = {}

            def route(request_route) -> None:
                url = request_route.request.url
                if url.startswith(origin) or url.startswith("data:") or url.startswith("blob:"):
                    request_route.continue_()
                else:
                    blocked.setdefault(url, []).append(current["page"])
                    request_route.abort()

            context.route("**/*", route)
            page = context.new_page()
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            current: dict = {"failed": [], "errors": [], "page": ""}

            def on_response(response) -> None:
                url = response.url
                if (response.status >= 400 and url.startswith(origin) and response.request.resource_type != "image"
                        and not url.endswith("/favicon.ico")):
                    current["failed"].append(f"{url[len(origin):]} ({response.status})")

            page.on("response", on_response)
            page.on("pageerror", lambda error: current["errors"].append(str(error).splitlines()[0][:200]))
            problem_shots = 0
            for name in pages:
                where = f"{name}.html"
                current["failed"].clear()
                current["errors"].clear()
                current["page"] = where
                if not (html / where).is_file():
                    report.problems.append(f"{where}: missing from the site (the table of contents lists it)")
                    continue
                try:
                    response = page.goto(base + where, wait_until="load")
                    if response is None or response.status >= 400:
                        report.problems.append(f"{where}: answered {response.status if response else 'nothing'}")
                        continue
                    found = page.evaluate(_INSPECT)
                except PlaywrightError as error:
                    report.problems.append(f"{where}: the browser could not check it: {str(error).splitlines()[0]}")
                    continue
                notebook = (html / "_sources" / f"{name}.ipynb").is_file()
                problems, notes = judge_page(name, found, links, source_title(html, name), notebook)
                problems += [f"{where}: could not load {failed}" for failed in current["failed"]]
                for error in current["errors"]:
                    if error in KNOWN_JS_ERRORS:
                        known.setdefault(error, []).append(where)
                    else:
                        problems.append(f"{where}: JavaScript error: {error}")
                report.problems += problems
                report.notes += notes
                if screenshots is not None and (name in screenshot_pages
                                                or (problems and problem_shots < PROBLEM_SCREENSHOTS)):
                    problem_shots += bool(problems) and name not in screenshot_pages
                    shot = screenshots / (name.replace("/", "__") + ".png")
                    try:
                        page.screenshot(path=str(shot))
                        report.screenshots.append(shot)
                    except PlaywrightError as error:
                        report.notes.append(f"{where}: no screenshot: {str(error).splitlines()[0]}")

            if (html / "index.html").is_file():
                try:
                    page.goto(base + "index.html", wait_until="load")
                    page.wait_for_url(f"**/{pages[0]}.html", timeout=10_000)
                except PlaywrightError:
                    report.problems.append(f"index.html: does not lead to the root page {pages[0]}.html ({page.url})")
            else:
                report.problems.append("index.html: missing from the site")

            if search is not None:
                report.problems += _check_search(page, base, html, search, pages, PlaywrightError)
            report.notes += [f"blocked a request to another host: {url} (from {_pages(where)})"
                             for url, where in blocked.items()]
            report.notes += [f"known JavaScript error, not counted: {error} ({KNOWN_JS_ERRORS[error]}; {_pages(where)})"
                             for error, where in known.items()]
        finally:
            browser.close()
    report.seconds = time.monotonic() - started
    return report


def _pages(names: list[str]) -> str:
    """``names`` for a note: all of them when few, else a count and the first three."""
    names = list(dict.fromkeys(names))
    return ", ".join(names) if len(names) <= 3 else f"{len(names)} pages: {', '.join(names[:3])}, ..."


def _check_search(page, base: str, html: Path, term: str, pages: list[str], error_type) -> list[str]:
    """``search.html?q=term`` lists at least one page of the table of contents."""
    from urllib.parse import quote

    if not (html / "search.html").is_file():
        return ["search.html: missing from the site"]
    try:
        page.goto(f"{base}search.html?q={quote(term)}", wait_until="load")
        page.wait_for_function(
            "() => { const r = document.querySelector('#search-results');"
            " return r && (r.querySelector('ul.search li')"
            " || /finished|did not match|no results/i.test(r.textContent)); }",
            timeout=PAGE_TIMEOUT_MS)
        found = page.evaluate("() => [...document.querySelectorAll('#search-results ul.search li a')]"
                              ".map((a) => a.getAttribute('href'))")
    except error_type as error:
        return [f"search.html: searching {term!r} did not finish: {str(error).splitlines()[0]}"]
    listed = {f"{name}.html" for name in pages}
    hits = [href for href in found if href.split("#")[0].split("?")[0] in listed]
    if not hits:
        return [f"search.html: searching {term!r} found no page of the table of contents ({len(found)} results)"]
    return []


# --- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path, help="the built site (e.g. _build/smoke/_build/html)")
    parser.add_argument("--screenshots", type=Path, help="folder for screenshots of a few pages")
    parser.add_argument("--toc", type=Path, default=ROOT / "_toc.yml",
                        help="the table of contents (default: the repository's)")
    parser.add_argument("--config", type=Path, default=ROOT / "_config.yml",
                        help="where the repository setting is read (default: the repo's _config.yml)")
    parser.add_argument("--search", default=DEFAULT_SEARCH,
                        help=f"a term the site's search must find (default {DEFAULT_SEARCH!r})")
    parser.add_argument("--page", action="append", dest="pages", help="check only this page (repeatable; path "
                        "without .html, e.g. book/part1/lora)")
    args = parser.parse_args(argv)

    if not (args.html / "index.html").is_file() and not args.pages:
        say(f"set-up FAILED: {args.html} holds no built site (no index.html)")
        return 2
    try:
        chromium, why = prepare()
    except (subprocess.CalledProcessError, OSError) as error:
        say(f"set-up FAILED: {error}")
        return 2
    if chromium is None:
        print(f"NOT RUN: {why}", flush=True)
        return NOT_RUN_EXIT
    pages = args.pages or toc_pages(args.toc)
    if args.pages and toc_pages(args.toc)[0] not in pages:
        pages = [toc_pages(args.toc)[0], *pages]
    say(f"{chromium}: opening {len(pages)} pages of {args.html}")
    from playwright.sync_api import Error as PlaywrightError

    try:
        report = check_site(args.html, chromium, pages, Links.from_config(args.config), args.search, args.screenshots)
    except PlaywrightError as error:  # Chromium is there but does not start (or dies): not a site problem
        say(f"set-up FAILED: the browser: {str(error).splitlines()[0]}")
        return 2
    for note in report.notes:
        say(f"note: {note}")
    for shot in report.screenshots:
        say(f"screenshot: {shot}")
    if report.problems:
        for problem in report.problems:
            print(f"PROBLEM: {problem}", flush=True)
        say(f"{len(report.problems)} problem(s) on {len(pages)} pages ({report.seconds:.0f} s)")
        return 1
    say(f"passed: {len(pages)} pages, index.html, search for {args.search!r} ({report.seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
