"""The browser check of the built site (.ci/browser_check.py) on tiny sites planted in tmp_path.

The pages mirror what Jupyter Book 1.x writes (the article, the MyST-NB output classes, MathJax's
configuration and the site's own MathJax, copied from the sphinx-mathjax-offline package), so the
check is tested in headless Chromium without building the book. These tests need Chromium: the
module's fixture installs Debian's package when it is missing and skips, saying why, only where it
cannot be installed (no apt-get, not root and no sudo, or the installation failed).
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from helpers import ROOT, load_script

browser_check = load_script(".ci/browser_check.py")

REPOSITORY = "https://github.com/example/book"
LINKS = browser_check.Links(REPOSITORY, "main", "https://colab.research.google.com")
PAGES = ["book/intro", "book/chapter"]


@pytest.fixture(scope="module")
def chromium() -> str:
    path, why = browser_check.prepare()
    if path is None:
        pytest.skip(f"Chromium is not installed and cannot be installed here: {why}")
    return path


def png(width: int = 4, height: int = 3) -> bytes:
    """A valid grey PNG image, written by hand."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def mathjax_folder() -> Path:
    """The MathJax that the book's sites carry (sphinx-mathjax-offline's copy)."""
    distribution = importlib.metadata.distribution("sphinx-mathjax-offline")
    script = next(file for file in distribution.files if str(file).endswith("static/mathjax/tex-chtml.js"))
    return Path(distribution.locate_file(script)).parent


MATH_CONFIG = ('<script>MathJax = {"options": {"processHtmlClass": "tex2jax_process|mathjax_process|math|output_area"}}'
               '</script>')


def page_html(title: str, body: str, page: str, math: bool = True) -> str:
    """A page the way Jupyter Book 1.x lays one out: header buttons, then the article."""
    depth = "../" * page.count("/")
    colab = LINKS.colab_link(page)
    scripts = MATH_CONFIG + f'<script defer="defer" src="{depth}_static/mathjax/tex-chtml.js"></script>' if math else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title} &#8212; A test book</title>{scripts}</head>
<body>
<div class="article-header-buttons">
  <a href="{colab}">Colab</a>
  <a href="{REPOSITORY}">Repository</a>
  <a href="{REPOSITORY}/issues/new?title=Issue%20on%20page%20%2F{page}.html">Open issue</a>
</div>
<article class="bd-article"><section class="tex2jax_ignore mathjax_ignore" id="top">
<h1>{title}<a class="headerlink" href="#top" title="Link to this heading">#</a></h1>
{body}
</section></article>
</body></html>
"""


GOOD_BODY = """<p>The update is <span class="math notranslate nohighlight">\\(W = W' + BA\\)</span>, and</p>
<div class="math notranslate nohighlight">\\[\\Delta W = \\frac{\\alpha}{r} B A.\\]</div>
<div class="cell_output docutils container">
<div class="output stream highlight-myst-ansi notranslate"><div class="highlight"><pre>accuracy 0.61</pre></div></div>
<div class="output text_html"><p>A price of $5 and $10, and code <code>x = a[0]$</code>.</p></div>
<img alt="a figure" src="../_static/plot.png" />
</div>
"""

SEARCH_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Search</title></head><body>
<div id="search-results"></div>
<script>
  // Stands in for Sphinx's searchtools.js: the same result markup, from a fixed index.
  const index = {"fedsa": ["book/chapter.html"], "lora": ["book/chapter.html"]};
  const words = new URLSearchParams(location.search).get("q").toLowerCase().split(/[^a-z0-9]+/).filter(Boolean);
  const hits = words.map((word) => index[word] || []).reduce((a, b) => a.filter((page) => b.includes(page)));
  const results = document.getElementById("search-results");
  setTimeout(() => {
    results.innerHTML = "<h2>Search Results</h2><p class='search-summary'>Search finished, found " + hits.length
      + " page(s).</p><ul class='search'>" + hits.map((page) => "<li><a href='" + page + "'>" + page + "</a></li>")
      .join("") + "</ul>";
  }, 200);
</script></body></html>
"""


def build_site(root: Path, chapters: dict[str, str], intro: str = "<p>Welcome.</p>") -> tuple[Path, Path]:
    """A site in ``root / "html"`` with the intro and ``chapters`` (name -> article body); (html, _toc.yml)."""
    html = root / "html"
    (html / "book").mkdir(parents=True)
    mathjax = html / "_static" / "mathjax"
    shutil.copytree(mathjax_folder() / "output", mathjax / "output")  # the fonts
    shutil.copy2(mathjax_folder() / "tex-chtml.js", mathjax / "tex-chtml.js")
    (html / "_static" / "plot.png").write_bytes(png())
    (html / "index.html").write_text('<meta http-equiv="Refresh" content="0; url=book/intro.html" />')
    (html / "search.html").write_text(SEARCH_PAGE)
    (html / "book" / "intro.html").write_text(page_html("A test book", intro, "book/intro"))
    sources = html / "_sources" / "book"
    sources.mkdir(parents=True)
    (sources / "intro.md").write_text("# A test book\n\nWelcome.\n")
    for name, body in chapters.items():
        title = name.replace("_", " ").capitalize()
        (html / "book" / f"{name}.html").write_text(page_html(title, body, f"book/{name}"))
        notebook = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": [f"# {title}\n", "\n", "Text."]}],
                    "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
        (sources / f"{name}.ipynb").write_text(json.dumps(notebook))
    toc = root / "_toc.yml"
    toc.write_text("format: jb-book\nroot: book/intro\nchapters:\n"
                   + "".join(f"  - file: book/{name}\n" for name in chapters))
    return html, toc


def problems_of(report, page: str) -> list[str]:
    return [problem for problem in report.problems if problem.startswith(f"{page}.html: ")]


def test_a_good_site_passes_and_keeps_screenshots(chromium, tmp_path):
    html, toc = build_site(tmp_path, {"chapter": GOOD_BODY})
    shots = tmp_path / "shots"
    pages = browser_check.toc_pages(toc)
    assert pages == PAGES
    report = browser_check.check_site(html, chromium, pages, LINKS, "FedSA-LoRA", shots)
    assert report.problems == []
    assert sorted(path.name for path in shots.iterdir()) == ["book__chapter.png", "book__intro.png"]
    assert all(path.stat().st_size > 1000 for path in shots.iterdir())


PLANTED = {
    "chapter": GOOD_BODY,
    "broken_image": GOOD_BODY.replace("plot.png", "missing.png")
    + '<img alt="corrupt" src="../_static/corrupt.png" />',
    "error_output": GOOD_BODY + """<div class="cell_output docutils container">
<div class="output traceback highlight-ipythontb notranslate"><div class="highlight"><pre>
---------------------------------------------------------------------------
AssertionError                            Traceback (most recent call last)
Cell In[7], line 3
AssertionError: FedIT should beat the probe</pre></div></div></div>""",
    "error_in_stderr": GOOD_BODY + """<div class="cell_output docutils container">
<div class="output stderr highlight-myst-ansi notranslate"><div class="highlight"><pre>
Traceback (most recent call last):
  File "worker.py", line 2, in &lt;module&gt;
ValueError: rank must be positive</pre></div></div></div>""",
    "warning_in_stderr": GOOD_BODY + """<div class="cell_output docutils container">
<div class="output stderr highlight-myst-ansi notranslate"><div class="highlight"><pre>UserWarning: a warning only
</pre></div></div></div>""",
    # a Markdown output rendered as CommonMark: its dollars reach the page as text
    "untypeset_dollars": GOOD_BODY + """<div class="cell_output docutils container"><p>The discordance is
$\\sum_k p_k (B_k - \\bar B)(A_k - \\bar A)$ here.</p></div>""",
    "tex_error": GOOD_BODY.replace("\\frac{\\alpha}{r}", "x^2^3"),  # MathJax: "Double exponent"
}


@pytest.fixture(scope="module")
def planted(chromium, tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    html, toc = build_site(root, PLANTED)
    (html / "_static" / "corrupt.png").write_bytes(b"not an image at all")
    # a page whose MathJax is missing: its formulas stay raw TeX
    (html / "book" / "no_mathjax.html").write_text(page_html("No mathjax", GOOD_BODY, "book/no_mathjax", math=False))
    (html / "_sources" / "book" / "no_mathjax.md").write_text("# No mathjax\n")
    pages = [*browser_check.toc_pages(toc), "book/no_mathjax"]
    return browser_check.check_site(html, chromium, pages, LINKS, "FedSA-LoRA", root / "shots")


def test_the_good_pages_of_a_planted_site_pass(planted):
    assert problems_of(planted, "book/intro") == []
    assert problems_of(planted, "book/chapter") == []


def test_a_planted_broken_image_is_reported_with_its_page(planted):
    problems = problems_of(planted, "book/broken_image")
    assert len(problems) == 2, problems
    assert "image does not load: ../_static/missing.png" in problems[0]
    assert "image does not load: ../_static/corrupt.png" in problems[1]


def test_a_planted_error_output_is_reported_with_its_page(planted):
    problems = problems_of(planted, "book/error_output")
    assert len(problems) == 1 and "error output" in problems[0] and "AssertionError" in problems[0], problems
    problems = problems_of(planted, "book/error_in_stderr")
    assert len(problems) == 1 and "ValueError: rank must be positive" in problems[0], problems
    # a warning on stderr is shown to the reader, but it is not an error: a note
    assert problems_of(planted, "book/warning_in_stderr") == []
    assert any(note.startswith("book/warning_in_stderr.html: stderr output") for note in planted.notes)


def test_a_planted_untypeset_formula_is_reported_with_its_page(planted):
    problems = problems_of(planted, "book/untypeset_dollars")
    assert len(problems) == 1, problems
    assert "raw TeX" in problems[0] and "\\sum_k p_k" in problems[0]
    problems = problems_of(planted, "book/no_mathjax")
    assert any("2 formula(s) not typeset" in problem for problem in problems), problems
    assert any("MathJax is not on the page" in problem for problem in problems), problems
    problems = problems_of(planted, "book/tex_error")
    assert len(problems) == 1 and "TeX error" in problems[0], problems


def test_wrong_links_a_failed_search_and_a_missing_page_are_reported(chromium, tmp_path):
    html, toc = build_site(tmp_path, {"chapter": GOOD_BODY})
    elsewhere = browser_check.Links("https://github.com/someone/else", "main", "https://colab.research.google.com")
    pages = [*browser_check.toc_pages(toc), "book/not_built"]
    report = browser_check.check_site(html, chromium, pages, elsewhere, "NoSuchMethod", None)
    chapter = problems_of(report, "book/chapter")
    assert any("no link to the repository https://github.com/someone/else" in p for p in chapter), chapter
    assert any("issues link" in p for p in chapter), chapter
    assert any("Colab link https://colab.research.google.com/github/example/book" in p for p in chapter), chapter
    assert any("no Colab launch link" in p for p in chapter), chapter
    assert problems_of(report, "search") == ["search.html: searching 'NoSuchMethod' found no page of the table of "
                                              "contents (0 results)"]
    assert problems_of(report, "book/not_built") == ["book/not_built.html: missing from the site (the table of "
                                                     "contents lists it)"]


def test_the_books_table_of_contents_lists_every_chapter_once_root_first():
    pages = browser_check.toc_pages(ROOT / "_toc.yml")
    assert pages[0] == "book/intro"
    assert len(pages) == len(set(pages))
    assert all((ROOT / f"{page}.ipynb").is_file() or (ROOT / f"{page}.md").is_file() for page in pages)
    links = browser_check.Links.from_config(ROOT / "_config.yml")
    tasks = load_script("tasks.py")
    assert links.repository == tasks.repository_url()
    assert links.colab_link("book/part1/lora") == (
        f"https://colab.research.google.com/github/{links.repository.split('github.com/')[1]}/blob/"
        f"{links.branch}/book/part1/lora.ipynb")


def test_headings_compare_without_markup_smart_quotes_or_dashes(tmp_path):
    assert browser_check.plain("The *client*\u2019s `rank` -- [LoRA](https://x)") == "The client's rank -- LoRA"
    sources = tmp_path / "_sources" / "book"
    sources.mkdir(parents=True)
    (sources / "page.md").write_text("---\ntitle: x\n---\n```python\n# not a heading\n```\n# The title\n")
    assert browser_check.source_title(tmp_path, "book/page") == "The title"
    assert browser_check.source_title(tmp_path, "book/absent") is None


def test_without_chromium_the_check_says_not_run_and_does_not_fail(monkeypatch, capsys, tmp_path):
    (tmp_path / "index.html").write_text("<p>site</p>")
    monkeypatch.setattr(browser_check, "prepare", lambda: (None, "there is no apt-get to install it"))
    assert browser_check.main([str(tmp_path)]) == browser_check.NOT_RUN_EXIT
    assert "NOT RUN: there is no apt-get to install it" in capsys.readouterr().out


def test_chromium_that_cannot_be_installed_gives_the_reason(monkeypatch):
    monkeypatch.setattr(browser_check.shutil, "which", lambda name: None)
    assert browser_check.install_chromium() == (None, "Chromium is not installed and there is no apt-get to install it")
    monkeypatch.setattr(browser_check.shutil, "which", lambda name: "/usr/bin/apt-get" if name == "apt-get" else None)
    monkeypatch.setattr(browser_check.os, "geteuid", lambda: 1000, raising=False)
    path, why = browser_check.install_chromium()
    assert path is None and why == "Chromium is not installed, and installing it needs root (not root, no sudo)"
