# QLoRA Studio. `make demo` starts the studio on the offline demo; `make test` runs the CPU test tier.
# Both create .venv and install what they need on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-gpu install install-dev browser lint bench clean

demo: install
	$(BIN)/python app.py

test: install-dev browser
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

install-dev: $(VENV)/.installed-dev
$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

# Headless Chromium for the end-to-end browser test (Debian's package; Playwright drives it), with a colour
# emoji font so the screenshots show the status icons (✅ ⚠️) rather than empty boxes.
browser:
	@{ command -v chromium && fc-list | grep -qi "color emoji"; } >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-color-emoji >/dev/null; \
		else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-color-emoji >/dev/null; fi; }

lint: install-dev
	$(BIN)/hadolint Dockerfile

bench: install
	$(BIN)/python -m bench.train_speed

clean:
	rm -rf $(VENV) models studio_home
