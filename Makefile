# fieldnode: `make demo` and `make test` set everything up themselves (venvs, pip, mosquitto via apt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# tflite-runtime has no wheels past Python 3.11: its venv uses the newest interpreter it supports.
TFLITE_PYTHON ?= $(shell for p in python3.11 python3.10 python3.9; do command -v $$p >/dev/null 2>&1 && { echo $$p; break; }; done)
TFLITE_VENV ?= .venv-tflite
DEMO_SECONDS ?= 30
PYTEST_ARGS ?=

.PHONY: all demo test wheel wheel-check systemd-tools bench venv tflite-venv mosquitto models clean

all: test

$(VENV)/.installed: setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

$(TFLITE_VENV)/.installed: setup.cfg pyproject.toml
	@test -n "$(TFLITE_PYTHON)" || { echo "tflite-runtime needs Python 3.9-3.11 (no wheels for 3.12+); install python3.11 or set TFLITE_PYTHON" >&2; exit 1; }
	@test -x $(TFLITE_VENV)/bin/python || $(TFLITE_PYTHON) -m venv $(TFLITE_VENV)
	$(TFLITE_VENV)/bin/python -m pip install -q --disable-pip-version-check 'numpy<2' tflite-runtime paho-mqtt pyserial cryptography 'tuf>=7,<8' 'tomli; python_version < "3.11"' pytest pytest-mock pytest-timeout
	$(TFLITE_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $@

tflite-venv: $(TFLITE_VENV)/.installed

mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing mosquitto with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; \
	else \
		echo "mosquitto is missing: run 'sudo apt-get install -y mosquitto' (or run make test as root)" >&2; exit 1; \
	fi

# systemd-analyze, systemd-sysusers and systemd-tmpfiles check the unit files in systemd/ (Debian's systemd).
systemd-tools:
	@if command -v systemd-analyze >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing systemd (for systemd-analyze) with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null; \
	else \
		echo "systemd-analyze is missing: run 'sudo apt-get install -y systemd' (or run make test as root)" >&2; exit 1; \
	fi

demo: venv
	$(VENV)/bin/fieldnode demo --seconds $(DEMO_SECONDS)

# What a board gets: the real wheel, installed non-editable in a fresh venv outside the checkout.
wheel-check: venv
	$(PY) tests/wheelcheck.py

# The wheel to copy onto a board (checked like wheel-check), in dist/.
wheel: venv
	$(PY) tests/wheelcheck.py --out dist

test: venv tflite-venv mosquitto systemd-tools wheel-check
	FIELDNODE_TEST_BACKEND=litert $(PY) -m pytest -q $(PYTEST_ARGS)
	FIELDNODE_TEST_BACKEND=tflite $(TFLITE_VENV)/bin/python -m pytest -q -m runtime $(PYTEST_ARGS) tests/runtime

bench: venv
	@for b in tests/benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

# Dev-only: regenerate the shipped models (needs TensorFlow, in its own venv).
models:
	@test -x .venv-models/bin/python || $(PYTHON) -m venv .venv-models
	.venv-models/bin/python -m pip install -q -e '.[models]'
	.venv-models/bin/python tools/make_models.py

clean:
	rm -rf $(VENV) $(TFLITE_VENV) .venv-models build *.egg-info .pytest_cache
