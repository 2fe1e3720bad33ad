# Two commands for a fresh machine: `make serve` and `make test`. Everything else is a step they run.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MODELS ?= models
SERVE_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: serve test install proto models architectures lint bench clean checkov tritonclient kserve chromium mlserver resample jpeg-region

# The environment: PyTorch pinned to the wheels on this machine's disk, then the project with every extra
# that the tests need, Ray included (the serving extras alone are what the Docker image gets). The image's
# pins constrain it, so that the tests run the versions the image ships (BentoML, gRPC, Ray...), not
# whatever PyPI released since: a bento built with a newer BentoML than the pinned one asks for both.
CONSTRAINTS := requirements/runtime.txt requirements/ray.txt requirements/cpu.txt
$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[serve,cpu,export,batch,ray,dev]' $(addprefix -c ,$(CONSTRAINTS))
	touch $@

install: $(STAMP)

# gRPC stubs come from the build, never from git.
PROTOS := $(wildcard proto/*.proto)
PROTO_STAMP := proto/.generated
$(PROTO_STAMP): $(PROTOS) $(STAMP)
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	touch $@

proto: $(PROTO_STAMP)

# The default model repository: two trained models (see export/defaults.py).
MODEL_STAMP := $(MODELS)/.built
$(MODEL_STAMP): $(STAMP) $(wildcard export/*.py)
	$(PY) -m export defaults --repository $(MODELS)
	touch $@

models: $(MODEL_STAMP)

# The compiled crop-only resize of exact preprocessing (service/resample.py). Without a C compiler the
# service resizes with Pillow instead: the same answers, slower.
RESAMPLE := service/native/resample.so
$(RESAMPLE): service/resample.c
	mkdir -p $(@D) && $(CC) -O3 -fPIC -shared -o $@ $< -lm || echo "no C compiler: exact preprocessing resizes with Pillow"
resample: $(RESAMPLE)

# The JPEG part decoder of exact preprocessing (service/jpeg_region.py). It needs libjpeg's headers (Debian's
# libjpeg62-turbo-dev), not its library: it uses the one Pillow loads. Without them, Pillow decodes every JPEG
# whole: the same answers, slower.
JPEG_REGION := service/native/jpeg_region.so
$(JPEG_REGION): service/jpeg_region.c
	mkdir -p $(@D) && $(CC) -O3 -fPIC -shared -o $@ $< || echo "no C compiler or libjpeg headers: Pillow decodes JPEGs whole"
jpeg-region: $(JPEG_REGION)

serve: $(STAMP) $(PROTO_STAMP) $(MODEL_STAMP) $(RESAMPLE) $(JPEG_REGION)
	$(PY) -m service serve --repository $(MODELS) $(SERVE_ARGS)

# checkov (tests/test_deploy_*.py) in its own virtualenv: its pins conflict with the dev extra's.
CHECKOV := build/checkov/bin/checkov
$(CHECKOV): requirements/checkov.txt
	test -x build/checkov/bin/python || $(PYTHON) -m venv build/checkov
	build/checkov/bin/python -m pip install -q -r requirements/checkov.txt
	touch $@

checkov: $(CHECKOV)

# NVIDIA's Triton client (tests/test_oip_triton_client.py), also apart: it pins protobuf < 7.
TRITONCLIENT := build/tritonclient/.installed
$(TRITONCLIENT): requirements/tritonclient.txt
	test -x build/tritonclient/bin/python || $(PYTHON) -m venv build/tritonclient
	build/tritonclient/bin/python -m pip install -q -r requirements/tritonclient.txt
	touch $@

tritonclient: $(TRITONCLIENT)

# KServe's Python package (tests/test_deploy_kserve.py checks k8s/kserve with its API models), also apart: it
# pins grpcio-tools, protobuf and psutil below the dev extra's.
KSERVE := build/kserve/.installed
$(KSERVE): requirements/kserve.txt
	test -x build/kserve/bin/python || $(PYTHON) -m venv build/kserve
	build/kserve/bin/python -m pip install -q -r requirements/kserve.txt
	touch $@

kserve: $(KSERVE)

# MLServer, the serving peer of `bench/bench_serving.py --peers mlserver`, apart too. Not part of `make test`:
# its smoke test skips without it.
MLSERVER := build/mlserver/.installed
$(MLSERVER): requirements/mlserver.txt
	test -x build/mlserver/bin/python || $(PYTHON) -m venv build/mlserver
	build/mlserver/bin/python -m pip install -q -r requirements/mlserver.txt
	touch $@

mlserver: $(MLSERVER)

# Debian's Chromium for the browser tests (tests/test_web_browser.py; Playwright's own browser download is not
# used). Installed with apt-get when it is missing; if that fails, those tests skip and say why.
CHROMIUM ?= /usr/bin/chromium
chromium:
	@test -x $(CHROMIUM) || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
		|| echo "chromium could not be installed: the browser tests will skip"

test: $(STAMP) $(PROTO_STAMP) $(MODEL_STAMP) $(RESAMPLE) $(JPEG_REGION) $(CHECKOV) $(TRITONCLIENT) $(KSERVE) chromium
	$(PY) -m ruff check .
	$(PY) -m pytest -q -ra

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Not part of `make test`: exports every registry entry and rewrites docs/ARCHITECTURES.md.
architectures: $(STAMP)
	$(PY) -m export architectures --out docs/ARCHITECTURES.md

bench: $(STAMP) $(PROTO_STAMP) $(MODEL_STAMP)
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(MODELS) proto/*_pb2*.py proto/*_pb2.pyi $(PROTO_STAMP) $(RESAMPLE) $(JPEG_REGION)
