"""Every page of the built book, as a reader sees it in a browser (headless Chromium).

    python -m pytest tests/test_rendered_pages.py --book-html _build/smoke/_build/html      (``make test`` runs this)

For each page: every formula typeset by the book's offline MathJax (no raw TeX, no TeX errors), every image loaded,
no error output or traceback in any cell, no failed request in the browser's console, and every internal link
pointing at a file (and anchor) that exists. Without ``--book-html`` (a plain ``pytest tests``) there is no book to
open and these tests are skipped.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from bs4 import BeautifulSoup

SKIPPED_PAGES = {"genindex.html", "search.html"}
INSTALL_HINT = ("headless Chromium and its driver are needed to test the rendered pages: on Debian/Ubuntu run "
                "`apt-get install chromium chromium-driver` (`make test` does this when it runs as root)")


def _pages(html_dir: Path) -> list[Path]:
    return sorted(path for path in html_dir.rglob("*.html")
                  if path.name not in SKIPPED_PAGES and not {"_static", "_sources", "reports", "_downloads",
                                                              "_images"} & set(path.relative_to(html_dir).parts))


def pytest_generate_tests(metafunc):
    if "page" in metafunc.fixturenames:
        html_dir = metafunc.config.getoption("--book-html")
        pages = _pages(Path(html_dir)) if html_dir else []
        if html_dir and not pages:
            raise pytest.UsageError(f"--book-html {html_dir}: no pages there; build the book first (make book-smoke)")
        metafunc.parametrize("page", pages, ids=[str(p.relative_to(html_dir)) for p in pages] if pages else None)


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -r requirements.txt")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.fail(f"missing {'chromium' if not binary else 'chromedriver'}: {INSTALL_HINT}")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    profile = tempfile.mkdtemp(prefix="book-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--allow-file-access-from-files", "--window-size=1280,1024"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@lru_cache(maxsize=None)
def _anchors(path: Path) -> frozenset[str]:
    soup = BeautifulSoup(path.read_text(errors="replace"), "html.parser")
    return frozenset(tag["id"] for tag in soup.find_all(id=True)) | frozenset(
        tag["name"] for tag in soup.find_all("a", attrs={"name": True}))


_WAIT_FOR_MATHJAX = """
const done = arguments[arguments.length - 1];
const started = Date.now();
if (!document.querySelector('script[src*="mathjax"]')) { done('no MathJax script'); return; }
(function poll() {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    MathJax.startup.promise.then(() => done('typeset'), (e) => done('error: ' + e));
  } else if (Date.now() - started > 20000) {
    done('no MathJax');
  } else {
    setTimeout(poll, 100);
  }
})();
"""

_INSPECT = """
const math = [...document.querySelectorAll('.math, span.math, div.math')];
const text = (el) => el.textContent || '';
return {
  math_elements: math.length,
  typeset: document.querySelectorAll('mjx-container').length,
  raw_tex: math.filter(el => !el.querySelector('mjx-container') && /\\\\[(\\[]|\\$\\$/.test(text(el)))
               .map(el => text(el).slice(0, 80)),
  tex_errors: [...document.querySelectorAll('mjx-merror')].map(el => el.getAttribute('data-mjx-error') || text(el)),
  raw_tex_in_text: (() => {  // TeX delimiters left in the reading text (outside code and typeset math)
    const found = [];
    const walker = document.createTreeWalker(document.querySelector('main') || document.body, NodeFilter.SHOW_TEXT, {
      acceptNode: (node) => node.parentElement.closest('pre, code, script, style, mjx-container, .math')
        ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT});
    while (walker.nextNode()) {
      const value = walker.currentNode.nodeValue;
      if (/\\$[^$\\s][^$]*\\$|\\\\\\(|\\\\\\[/.test(value)) found.push(value.trim().slice(0, 80));
    }
    return found;
  })(),
  broken_images: [...document.images].filter(img => !(img.complete && img.naturalWidth > 0))
                   .map(img => img.getAttribute('src')),
  error_outputs: [...document.querySelectorAll('.cell_output .output.traceback, .cell_output .output.error, ' +
                   '.cell_output .stderr')].map(el => text(el).slice(0, 200)),
  tracebacks: [...document.querySelectorAll('.cell_output')]
                .filter(el => /Traceback \\(most recent call last\\)/.test(text(el))).map(el => text(el).slice(0, 200)),
  links: [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href')),
};
"""


def test_page_renders_for_a_reader(browser, page, request):
    html_dir = Path(request.config.getoption("--book-html"))
    name = page.relative_to(html_dir)
    browser.get_log("browser")  # drop what earlier pages logged
    browser.get(page.resolve().as_uri())
    page = Path(unquote(urlsplit(browser.current_url).path))  # a redirect page (index.html) lands on another
    mathjax = browser.execute_async_script(_WAIT_FOR_MATHJAX)
    seen = browser.execute_script(_INSPECT)
    problems = []
    if seen["math_elements"] and mathjax != "typeset":
        problems.append(f"MathJax did not typeset the page's {seen['math_elements']} formulas ({mathjax})")
    if seen["math_elements"] and not seen["typeset"]:
        problems.append("no formula was typeset")
    for label, key in (("raw TeX left", "raw_tex"), ("raw TeX in the text", "raw_tex_in_text"),
                       ("TeX errors", "tex_errors"), ("images not loaded",
                       "broken_images"), ("error output in cells", "error_outputs"), ("tracebacks", "tracebacks")):
        if seen[key]:
            problems.append(f"{label}: {seen[key][:3]}")
    time.sleep(0.5)  # let late errors reach the log before it is read
    failed_requests = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    if failed_requests:
        problems.append(f"browser errors: {failed_requests[:3]}")
    dead = []
    for href in seen["links"]:
        parts = urlsplit(href)
        if parts.scheme or href.startswith(("mailto:", "javascript:")) or not (parts.path or parts.fragment):
            continue
        target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
        if target.is_dir():
            target = target / "index.html"
        if not target.exists():
            dead.append(href)
        elif parts.fragment and target.suffix == ".html" and unquote(parts.fragment) not in _anchors(target):
            dead.append(href)
    if dead:
        problems.append(f"internal links to nothing: {sorted(set(dead))[:5]}")
    assert not problems, f"{name}: " + "; ".join(problems)
