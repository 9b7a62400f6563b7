# Two commands for a newcomer:  `make up` (install + a local mesh)  and  `make test` (install + the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch for the tests and the local demo; GPU users install the project into their own env.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install system-deps up lint test test-quick bench gpu-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" -e '.[test,lint]'
	touch $@

install: $(VENV)/.installed

# Debian packages the tests use: a real browser for the status page test, promtool (package prometheus) for the
# Prometheus config, alert rules and dashboard queries in docker/, podman (with runc and uidmap) and debootstrap to
# build and run the images (tests/containers), netavark and aardvark-dns for the compose test's bridge network with
# DNS between containers (Debian's podman does not depend on them), and iptables, which netavark runs to set up that
# network (without it every container of the stack stays "Created": "netavark: No such file or directory"). kubectl, for `kubectl kustomize`, comes with the
# machine image.
system-deps:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v podman >/dev/null 2>&1 || missing="$$missing podman"; \
	command -v runc >/dev/null 2>&1 || missing="$$missing runc"; \
	command -v newuidmap >/dev/null 2>&1 || missing="$$missing uidmap"; \
	command -v debootstrap >/dev/null 2>&1 || missing="$$missing debootstrap"; \
	test -x /usr/lib/podman/netavark || missing="$$missing netavark"; \
	test -x /usr/lib/podman/aardvark-dns || missing="$$missing aardvark-dns"; \
	command -v iptables >/dev/null 2>&1 || test -x /usr/sbin/iptables || missing="$$missing iptables"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

up: install
	$(VENV)/bin/mesh up

# Lint (ruff's checks and format, mypy on the coordinator and the torch-free part of mesh/), pinned in pyproject.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Lint, then everything, the container test included (what CI runs), with the 20 slowest tests printed. On one
# worker: two xdist workers took the suite from 23 to 15 min here, but exposed timing-dependent failures of the
# multi-process tests under load (docs/architecture.md, Tests).
test: lint system-deps
	$(PY) -m pytest -m "" --durations=20 $(PYTEST_ARGS)

# The default suite: everything but the container test (image builds take minutes).
test-quick: install system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

# Benchmarks print figures (ratios against their targets); they are not tests.
bench: install
	$(PY) -m tests.bench.heartbeat
	$(PY) -m tests.bench.allreduce
	$(PY) -m tests.bench.training --clipped
	$(PY) -m tests.bench.diloco
	$(PY) -m tests.bench.parameter_round

# On a CUDA machine (install the project into an env with a CUDA build of torch, or TORCH_SPEC=torch): a bootstrap
# and 2 peers on the demo task, cuda:0/cuda:1 (both on cuda:0 with one GPU), bf16; checks equal parameters and a
# falling loss, prints the step overhead against a plain CUDA loop. Exits 2 without CUDA.
gpu-check: install
	$(PY) -m tests.gpu_check

clean:
	rm -rf $(VENV) .pytest_cache
