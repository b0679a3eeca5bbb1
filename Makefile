# The book's two commands: `make book` (build the rendered book) and `make test` (every test).
# Both create the environment in .venv and fetch the data when missing.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
MATHJAX := book_static/mathjax/es5/tex-mml-chtml.js
JB_FLAGS := -W -n --keep-going
CHAPTER_FILES := $(sort $(wildcard chapters/0[0-9]_*.md))

.PHONY: book test pytest nbval book-smoke pages browser notebooks env data clean help

help:
	@echo "make book   build the rendered book in _build/html (executes every chapter, profile 'default')"
	@echo "make test   package tests, then the book built once in profile 'smoke': every chapter executes with the"
	@echo "            shipped checkpoints and small samples, and every chapter's claims are asserted; then every"
	@echo "            page is opened in headless Chromium (installed with apt-get when missing)"
	@echo "make notebooks   _build/notebooks/<chapter>_student.ipynb (exercises as stubs) and <chapter>_solutions.ipynb"
	@echo "make nbval CHAPTERS=chapters/06_fast_sampling.md   one chapter under nbval (profile 'smoke'), cell by cell"

env: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

data: $(STAMP)
	$(BIN)/python -m diffbook.data mnist fashion_mnist

# MathJax served from the book itself, so formulas render offline (npm package, no install scripts).
$(MATHJAX):
	rm -rf book_static/mathjax && mkdir -p book_static/mathjax
	tmp=$$(mktemp -d) && (cd $$tmp && npm pack --silent mathjax@3.2.2 >/dev/null) \
	  && tar -xzf $$tmp/mathjax-3.2.2.tgz -C $$tmp package/es5 && mv $$tmp/package/es5 book_static/mathjax/es5 && rm -rf $$tmp

# Student and solution notebooks for every chapter; each page links its two.
notebooks: $(STAMP)
	$(BIN)/python -m diffbook.handouts $(filter-out chapters/00_%,$(CHAPTER_FILES)) --out _build/notebooks

# Incremental: the execution cache is keyed on each chapter's code, the package modules and checkpoints it uses,
# and the profile (diffbook.book_cache); stale chapters execute two at a time, then Sphinx re-reads changed pages.
book: $(STAMP) data $(MATHJAX) notebooks
	DIFFBOOK_PROFILE=default $(BIN)/python -m diffbook.book_cache --cache _build/.jupyter_cache $(CHAPTER_FILES)
	DIFFBOOK_PROFILE=default $(BIN)/jupyter-book build $(JB_FLAGS) .
	@echo "open _build/html/index.html"

pytest: $(STAMP) data
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests

# Debugging aid, not part of `make test` (the smoke build executes every chapter once already).
CHAPTERS ?= chapters
nbval: $(STAMP) data
	DIFFBOOK_PROFILE=smoke $(BIN)/python -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env \
	  --nbval-cell-timeout=600 $(CHAPTERS)

# The chapters' asserts are their claims: a failing cell fails the build (-W), and its traceback is printed.
book-smoke: $(STAMP) data $(MATHJAX) notebooks
	rm -rf _build/smoke/_build/html/reports
	DIFFBOOK_PROFILE=smoke $(BIN)/python -m diffbook.book_cache --cache _build/smoke/_build/.jupyter_cache \
	  $(CHAPTER_FILES)
	DIFFBOOK_PROFILE=smoke $(BIN)/jupyter-book build --all $(JB_FLAGS) --path-output _build/smoke . \
	  || { find _build/smoke/_build/html/reports -name "*.log" -exec cat {} + 2>/dev/null; exit 1; }

# Headless Chromium for the page tests: Debian's packages, installed when we may (root with apt-get).
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium and chromium-driver (apt-get)"; \
	    apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
	      || { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }; \
	  else echo "the page tests need Chromium: sudo apt-get install chromium chromium-driver"; exit 1; fi; fi

# Every built page opened in headless Chromium: formulas typeset, images loaded, no error output, links resolve.
pages: $(STAMP) browser book-smoke
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_rendered_pages.py --book-html _build/smoke/_build/html

test: pytest book-smoke pages

clean:
	rm -rf _build
