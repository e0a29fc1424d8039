# QLoRA Studio. `make demo` starts the studio on the offline demo; `make test` runs the CPU test tier.
# Both create .venv and install what they need on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-gpu install install-dev browser go lint bench clean

demo: install
	$(BIN)/python app.py

test: install-dev browser go
	$(BIN)/python -m pytest

# The GPU tier runs on the machine's own Python (its CUDA torch); what is missing goes into .gpu-site/, from
# WHEELS=DIR when given (a machine without internet), else the registry.  ORDER=reverse|random[:SEED].
test-gpu:
	$(PY) scripts/gpu_tier.py $(if $(WHEELS),--wheels $(WHEELS)) $(if $(ORDER),--order $(ORDER))

install: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/python -m studio build-tiny
	touch $@

# llama-cpp-python builds llama.cpp from source (no wheel on PyPI): a portable CPU build (no -march=native, so
# results do not depend on the CPU it was built on), without the multimodal library the studio does not use, on
# every core.  pip caches the built wheel, so later installs on the same machine take seconds.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DGGML_BLAS=OFF
install-dev: $(VENV)/.installed-dev
$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install -q -r requirements-dev.txt
	touch $@

# Headless Chromium for the end-to-end browser test (Debian's package; Playwright drives it), with a colour
# emoji font so the screenshots show the status icons (✅ ⚠️) rather than empty boxes.
browser:
	@{ command -v chromium && fc-list | grep -qi "color emoji"; } >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-color-emoji >/dev/null; \
		else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-color-emoji >/dev/null; fi; }

# Go's text/template (Debian's golang-go) renders the Ollama Modelfile templates in tests/test_gguf.py, as Ollama does.
go:
	@command -v go >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go >/dev/null; \
		else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go >/dev/null; fi; }

lint: install-dev
	$(BIN)/hadolint Dockerfile

bench: install
	$(BIN)/python -m bench.train_speed

clean:
	rm -rf $(VENV) models studio_home
