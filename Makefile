# Two entry points for a fresh machine:  `make demo` (run the gateway)  and  `make test` (run every check).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# binary:debian-package pairs the tests need; installed with apt-get when missing and running as root
SYSDEPS := curl:curl prometheus:prometheus promtool:prometheus redis-server:redis-server nginx:nginx systemd-analyze:systemd docker-compose:docker-compose wrk:wrk

.PHONY: demo test lint sysdeps clean bench

# The runtime alone: all `make demo` needs. `make test` adds the test extra (linters, type checker, tools).
# Made fast for a first `make demo`: when the system pip can install into another interpreter (pip >= 22.3),
# the venv is created without ensurepip (~5 s of CPU) and gets pip from that install; --no-compile leaves
# bytecode to the first import of what is used (~4 s of CPU less).
PIP_QUIET := --quiet --disable-pip-version-check
$(VENV)/.runtime: pyproject.toml
	@if $(PYTHON) -m pip --python "$$(command -v $(PYTHON))" --version >/dev/null 2>&1; then \
	  set -x; $(PYTHON) -m venv --without-pip $(VENV) && \
	  $(PYTHON) -m pip --python $(BIN)/python install $(PIP_QUIET) --no-compile -e . pip; \
	else \
	  set -x; $(PYTHON) -m venv $(VENV) && $(BIN)/pip install $(PIP_QUIET) --no-compile -e .; \
	fi
	touch $@

# Then bytecode for everything the tests import: the runtime went in without it (above), and where
# PYTHONDONTWRITEBYTECODE is set none is ever written, so every gateway, simulator and CLI call a test starts
# compiled fastapi, pydantic, ... from source again (~0.6 s of CPU each, half of a gateway's start).
$(VENV)/.installed: $(VENV)/.runtime pyproject.toml
	$(BIN)/pip install $(PIP_QUIET) -e '.[test]'
	$(BIN)/python -c 'import compileall as c, sysconfig as s; [c.compile_dir(d, quiet=2, workers=0) for d in (s.get_paths()["purelib"], "src")]'
	touch $@

sysdeps:
	@missing=""; for pair in $(SYSDEPS); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing system packages:$$missing (sudo apt-get install$$missing)"; exit 1; fi; fi

# Where the demo listens: BASTION_HOST / BASTION_PORT from the environment (or make's command line), passed as
# flags so the banner and the gateway agree whatever a .env says.
DEMO_HOST := $(or $(BASTION_HOST),127.0.0.1)
DEMO_PORT := $(or $(BASTION_PORT),8000)
DEMO_URL  := http://$(if $(findstring :,$(DEMO_HOST)),[$(DEMO_HOST)],$(DEMO_HOST)):$(DEMO_PORT)

demo: $(VENV)/.runtime
	@key=bst-demo_$$($(BIN)/python -c 'import secrets; print(secrets.token_urlsafe(32))'); \
	  echo "bastion demo: gateway on $(DEMO_URL) supervising the vLLM simulator (no GPU needed); Ctrl-C stops both"; \
	  echo "demo API key (valid while this runs): $$key"; \
	  echo "try: curl -N $(DEMO_URL)/v1/chat/completions -H 'authorization: Bearer $$key' -H 'content-type: application/json' \\"; \
	  echo "       -d '{\"model\":\"qwen2.5-7b-instruct\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"stream\":true}'"; \
	  BASTION_API_KEYS=$$key exec $(BIN)/bastion serve --host $(DEMO_HOST) --port $(DEMO_PORT) \
	    --upstream-command '{python} -m bastion simulate --host {host} --port {port} --itl 0.02'

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

# pytest twice: the tests that measure no time on every core (pytest-xdist; -n auto is 2 on the 2-core CI box;
# a module stays on one worker, so its module-scoped gateway starts once),
# then those marked `serial` (they assert a duration, a rate or a ratio of timings) alone, so that nothing
# running beside them skews what they measure. docs/testing.md says how to run one test.
PYTEST_WORKERS ?= auto
test: sysdeps $(VENV)/.installed lint
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadscope -m "not soak and not serial"
	$(BIN)/pytest -m "serial and not soak"

bench: $(VENV)/.installed
	@command -v wrk >/dev/null && command -v nginx >/dev/null || $(MAKE) sysdeps SYSDEPS="wrk:wrk nginx:nginx"
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
