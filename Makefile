# Two entry points (README quickstart): `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo demo-quick test bench clean

$(BIN)/sdtl: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	@# torchcodec is optional (faster decoding); it needs FFmpeg's shared libraries (apt-get install ffmpeg).
	-$(BIN)/pip install -q "torchcodec>=0.2" || echo "torchcodec not installed: PyAV will decode"
	@touch $(BIN)/sdtl

setup: $(BIN)/sdtl

demo: setup
	$(BIN)/sdtl demo --out sdtl-demo

demo-quick: setup
	$(BIN)/sdtl demo --quick --out sdtl-demo-quick

# one pytest worker per core (pytest-xdist), one torch thread each: the suite's runs are small
test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto

bench: setup
	$(BIN)/python benchmarks/sd_overhead.py
	$(BIN)/python benchmarks/regularizer_overhead.py
	$(BIN)/python benchmarks/data_pipeline.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
