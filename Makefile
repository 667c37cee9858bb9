# Every target works on a fresh clone: `make test` and `make demo` create the virtualenv first.
#   make install                    users: torch + mimicfilter (no test tools), with pip's progress shown
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
#                                   torch's CPU-only build (no CUDA libraries to download)
#   make dev                        also the test tools (pytest) and Ray; `make test` runs it first
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision are pinned to the builds this project is tested with; override for other platforms.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TORCH_INDEX ?=
DEMO_RUN ?= demo-run

.PHONY: install dev test test-fast demo bench bench-quality clean

install: $(VENV)/.installed

dev: $(VENV)/.installed-dev

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_SPEC)
	$(PY) -m pip install -e .
	touch $@

# The dev extras on top of the user install (skipped where they are already there).
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -c "import pytest, pytest_timeout, ray" 2>/dev/null || $(PY) -m pip install -e '.[dev]'
	touch $@

test: dev
	$(PY) -m pytest -q

test-fast: dev
	$(PY) -m pytest -q -m "not slow"

demo: install
	$(VENV)/bin/mimicfilter score demo/shards --trusted demo/trusted --model demo/tiny-clip.json \
		--reference demo/reference.safetensors --batch-size 128 --epochs 3 --out $(DEMO_RUN) --overwrite
	$(VENV)/bin/mimicfilter filter $(DEMO_RUN) --out $(DEMO_RUN)/curated --write-shards $(DEMO_RUN)/curated/shards
	$(PY) scripts/demo_summary.py $(DEMO_RUN)
	$(VENV)/bin/mimicfilter report $(DEMO_RUN) --filter-manifest $(DEMO_RUN)/curated/manifest.parquet \
		--out $(DEMO_RUN)/report

# Benchmarks (docs/benchmarks.md): `make bench-NAME [ARGS='...']` runs benchmarks/bench_NAME.py, or
# benchmarks/NAME.py, or benchmarks/gpu/bench_NAME.py (dashes for underscores) with ARGS, e.g.
#   make bench-score ARGS='--max-shards 1'    make bench-defaults    make bench-quality-imagetext ARGS=--quick
#   make bench-stage1    make bench-explain-unseen    make bench-filter-versions ARGS='--a A/python --b B/python'
BENCH_NAME = $(subst -,_,$*)
BENCH_SCRIPT = $(firstword $(wildcard benchmarks/bench_$(BENCH_NAME).py benchmarks/$(BENCH_NAME).py \
	benchmarks/gpu/bench_$(BENCH_NAME).py))
bench-%: install
	$(if $(BENCH_SCRIPT),$(PY) $(BENCH_SCRIPT) $(ARGS),@echo "no benchmark script for $@ in benchmarks/" >&2; exit 2)

# Static scoring speed, and the image–text quality benchmark (the names the docs have used).
bench: bench-score
bench-quality: bench-quality-imagetext

clean:
	rm -rf $(VENV) $(DEMO_RUN) .pytest_cache *.egg-info
