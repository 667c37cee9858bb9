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

.PHONY: install dev test test-fast demo bench bench-quality bench-defaults clean

install: $(VENV)/.installed

dev: $(VENV)/.installed-dev

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_SPEC)
	$(PY) -m pip install -e .
	touch $@

# The dev extras on top of the user install (skipped where they are already there).
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -c "import pytest, ray" 2>/dev/null || $(PY) -m pip install -e '.[dev]'
	touch $@

test: dev
	$(PY) -m pytest -q

test-fast: dev
	$(PY) -m pytest -q -m "not slow"

demo: install
	$(VENV)/bin/mimicfilter score demo/shards --model demo/tiny-clip.json \
		--reference demo/reference.safetensors --batch-size 128 --epochs 3 --out $(DEMO_RUN) --overwrite
	$(VENV)/bin/mimicfilter filter $(DEMO_RUN) --out $(DEMO_RUN)/curated --write-shards $(DEMO_RUN)/curated/shards
	$(PY) scripts/demo_summary.py $(DEMO_RUN)
	$(VENV)/bin/mimicfilter report $(DEMO_RUN) --filter-manifest $(DEMO_RUN)/curated/manifest.parquet \
		--out $(DEMO_RUN)/report

bench: install
	$(PY) benchmarks/bench_score.py

bench-quality: install
	$(PY) benchmarks/quality_imagetext.py

# The validation suite the filter's defaults are chosen on (docs/benchmarks.md); cached in bench-runs/defaults.
bench-defaults: install
	$(PY) benchmarks/bench_defaults.py

clean:
	rm -rf $(VENV) $(DEMO_RUN) .pytest_cache *.egg-info

# Stage 1 (re-weighting while training): Fashion-MNIST and the emoji CLIP, plain vs Grad-Mimic (docs/training.md).
.PHONY: bench-stage1
bench-stage1: install
	$(PY) benchmarks/stage1.py
