# Entry points for a fresh Debian machine, as root. Each target installs what
# it needs: Debian packages for FUSE and TLS, then a virtualenv in .venv.

VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
SOURCES := csi fs tests scripts bench setup.py
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv openssl util-linux

.PHONY: demo test e2e bench lint deps system-deps install clean

demo: install
	$(PY) scripts/demo.py

test: lint
	$(PY) -m pytest -q tests

# Needs docker (with a running daemon), kind and kubectl; skips, saying
# which is missing, anywhere else.
e2e: install
	$(PY) -m pytest -q -rs tests/e2e

# Not part of the tests: prints a table and writes bench/results.json.
bench: install
	$(PY) bench/run.py

lint: install
	$(VENV)/bin/ruff check $(SOURCES)
	$(VENV)/bin/ruff format --check $(SOURCES)
	$(VENV)/bin/mypy -p secretfs.csi -p secretfs.fs

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	    dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

$(PY): | system-deps
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

deps: $(VENV)/.deps

$(VENV)/.deps: pyproject.toml | $(PY)
	$(PIP) install -q ".[test]"
	touch $@

# Reinstalled every time: the package is built from the checkout (the CSI
# stubs are compiled from protos/csi.proto at build time).
install: deps
	$(PIP) install -q --no-deps --no-build-isolation --force-reinstall .

clean:
	rm -rf $(VENV) build *.egg-info
