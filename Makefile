# rwkv_ref: every command a newcomer needs. The first target run creates .venv and installs
# into it; later runs reuse it (the stamp is refreshed when pyproject.toml changes).
#
#   make run         train the default (cpu) model on tiny-shakespeare, then sample from it
#   make test        the whole test suite, notebooks included (what CI runs)
#   make test-slow   the same with the thorough hypothesis profile and slow tests
#   make bench       benchmarks: figures printed side by side with their references
#   make compare     RWKV against the GPT baseline at equal parameters and tokens
#   make recipe      what each of the official trainer's extras does to RWKV's loss
#   make book        the HTML book built from notebooks/ (warnings are errors)
#   make book-check  the book opened in headless Chromium: math rendered, plots loaded
#   make student     the student edition of the chapters, in student/ (exercises as stubs)
#   make grade NB=student/02_wkv_as_written.ipynb   grade a student's chapter
#   make experiments what RWKV can and cannot do, at full size (out/experiments/)
#   make gpu-check   on a CUDA machine: build, test and time the CUDA kernel and the gpu preset

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
# torch is pinned here: on a CPU-only machine pip takes the local CPU build of 2.13.0
# instead of downloading a multi-GB CUDA build. GPU users: see the README.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
BOOK_STAMP := $(VENV)/.installed-book
export PYTHONUNBUFFERED := 1

.PHONY: install run train sample test test-fast test-slow bench compare recipe book book-check student grade \
	experiments gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

$(BOOK_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[book]"
	touch $@

run: $(STAMP)
	$(PY) -m rwkv_ref.train --preset=cpu --out_dir=out/cpu
	$(PY) -m rwkv_ref.generate --checkpoint=out/cpu/ckpt.pt --prompt="ROMEO:" --max_new_tokens=500

# The suite and the chapters (nbval), the grader on the chapters themselves (every exercise
# must pass: tests/test_course.py) and on a fresh student edition (every exercise must be a
# stub: tests/test_student.py), in two processes (pytest-xdist; a notebook's cells stay
# together in one).
PYTEST_JOBS ?= 2
test: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_JOBS) --dist loadfile --nbval-lax tests notebooks

test-slow: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_JOBS) --dist loadfile --nbval-lax --hypothesis-profile=thorough --run-slow tests notebooks

bench: $(STAMP)
	$(PY) -m benchmarks.run

compare: $(STAMP)
	$(PY) -m rwkv_ref.compare --out_dir=out/compare

recipe: $(STAMP)
	$(PY) -m rwkv_ref.compare --recipe --full_iters=250 --out_dir=out/recipe

student: $(STAMP)
	$(PY) -m rwkv_ref.student --out student

NB ?= student/*.ipynb
grade: $(STAMP)
	$(PY) -m rwkv_ref.grade $(NB)

experiments: $(STAMP)
	$(PY) -m rwkv_ref.experiments --out_dir=out/experiments --size=full
	$(PY) -m rwkv_ref.precision --out_dir=out/experiments

# A GPU machine may have no network: where the system's python3 already holds a CUDA build of
# torch, the check runs with it from this checkout and installs nothing; elsewhere it uses .venv
# (and there, without a GPU, says so and exits 0).
gpu-check:
	@if $(PYTHON) -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; \
	then PYTHONPATH=$(CURDIR) $(PYTHON) -m benchmarks.gpu_check; \
	else $(MAKE) --no-print-directory install && $(PY) -m benchmarks.gpu_check; fi

# MathJax is served from a local copy (no network at build or view time); npm fetches it once.
MATHJAX := book/_build/mathjax/node_modules/mathjax/es5/tex-chtml.js

$(MATHJAX):
	@command -v npm >/dev/null 2>&1 || \
		{ echo "make book needs npm (Debian/Ubuntu: apt-get install -y nodejs npm)"; exit 1; }
	npm install --silent --no-save --no-package-lock --no-audit --no-fund \
		--prefix book/_build/mathjax mathjax@3.2.2

book: $(BOOK_STAMP) $(MATHJAX)
	$(BIN)/jupyter-book build book --warningiserror --keep-going

book-check: book
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		{ echo "make book-check needs Chromium (Debian/Ubuntu: apt-get install -y chromium)"; exit 1; }
	$(PY) -m pytest -p no:cacheprovider tests/book_check.py

clean:
	rm -rf out student book/_build .pytest_cache .hypothesis
