# fieldnode: `make demo` and `make test` set everything up themselves (venvs, pip, mosquitto via apt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# tflite-runtime has no wheels past Python 3.11: its venv uses the newest interpreter it supports.
TFLITE_PYTHON ?= $(shell for p in python3.11 python3.10 python3.9; do command -v $$p >/dev/null 2>&1 && { echo $$p; break; }; done)
TFLITE_VENV ?= .venv-tflite
DEMO_SECONDS ?= 30
PYTEST_ARGS ?=
# Raspberry Pi OS trixie's Python: where python3.13 is installed (on PATH, or a pyenv version), make test also
# runs PY313_TESTS under it in its own venv.
PY313 ?= $(shell for p in python3.13 $$(command -v pyenv >/dev/null 2>&1 && ls -d "$$(pyenv root)"/versions/3.13*/bin/python3.13 2>/dev/null); do $$p -c '' >/dev/null 2>&1 && { echo $$p; break; }; done)
PY313_VENV ?= .venv-py313
# Under 3.13: config, CLI, units and install (tests/unit), the inference runtime with its worker processes on the
# cp313 LiteRT wheel (tests/runtime) and the update path with its crypto (tests/update): about 3 min measured.
# The link, power, driver and end-to-end tests (about 4 min more) are pure Python over the same dependencies and
# would take an uncached CI run (10.5 min now, the image root built beside the suites) near 15 minutes.
PY313_TESTS ?= tests/unit tests/runtime tests/update tests/e2e
# The image tests' debootstrap roots (arm64, amd64) and pip downloads, kept between runs (outside the checkout).
IMAGE_CACHE ?= $(HOME)/.cache/fieldnode-image

.PHONY: all demo test lint wheel wheel-check systemd-tools image-tools image-test nspawn-test py313-test bench venv tflite-venv mosquitto models clean

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

$(PY313_VENV)/.installed: setup.cfg pyproject.toml
	@test -x $(PY313_VENV)/bin/python || $(PY313) -m venv $(PY313_VENV)
	$(PY313_VENV)/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

# The suite (PY313_TESTS) under Python 3.13, or one line saying it is not installed.
py313-test:
	@if [ -z "$(PY313)" ]; then echo "python3.13 is not installed: the Python 3.13 run (Raspberry Pi OS trixie) is skipped"; \
	else $(MAKE) --no-print-directory $(PY313_VENV)/.installed && \
		echo "running $(PY313_TESTS) under $$($(PY313_VENV)/bin/python -V) ($(PY313_VENV))" && \
		FIELDNODE_TEST_BACKEND=litert $(PY313_VENV)/bin/python -m pytest -q $(PYTEST_ARGS) $(PY313_TESTS); fi

# $(call apt_need,CHECK,PACKAGES): nothing when the shell test CHECK passes; else, as root, PACKAGES are installed
# with apt-get; else make stops with the one command to run.
apt_need = @if $(1); then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing $(2) with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null; \
	else \
		echo "missing: run 'sudo apt-get install -y $(2)' (or run make as root)" >&2; exit 1; \
	fi

mosquitto:
	$(call apt_need,command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto,mosquitto)

# systemd-analyze, systemd-sysusers and systemd-tmpfiles check the unit files in systemd/ (Debian's systemd).
systemd-tools:
	$(call apt_need,command -v systemd-analyze >/dev/null 2>&1,systemd)

# debootstrap, qemu-user-static and binfmt-support for the arm64 image test; systemd-container (systemd-nspawn)
# for its systemd stage.
image-tools:
	$(call apt_need,command -v debootstrap >/dev/null 2>&1 && command -v qemu-aarch64-static >/dev/null 2>&1 \
		&& command -v update-binfmts >/dev/null 2>&1 && command -v systemd-nspawn >/dev/null 2>&1,qemu-user-static \
		binfmt-support debootstrap systemd-container)

# The closest thing to a board: fieldnode install --root into an arm64 Debian bookworm root, then selftest,
# diag --sim and run --sim in it under qemu-user as a Cortex-A72 (tests/image/imagetest.py).
image-test: venv mosquitto image-tools
	$(PY) -m tests.image.imagetest --cache $(IMAGE_CACHE)

# The unit under a real systemd: fieldnode install --root into an amd64 Debian bookworm root, booted with
# systemd-nspawn; READY, reload, the watchdog, the stop drain and the sandbox (tests/image/nspawntest.py).
nspawn-test: venv mosquitto image-tools
	$(PY) -m tests.image.nspawntest --cache $(IMAGE_CACHE)

demo: venv
	$(VENV)/bin/fieldnode demo --seconds $(DEMO_SECONDS)

# What a board gets: the real wheel, installed non-editable in a fresh venv outside the checkout.
wheel-check: venv
	$(PY) tests/wheelcheck.py

# The wheel to copy onto a board (checked like wheel-check), in dist/.
wheel: venv
	$(PY) tests/wheelcheck.py --out dist

# The image tests' debootstrap roots (minutes, mostly downloads and unpacking) are prepared beside the test runs,
# which leave a core idle most of the time; the image tests themselves wait for them (a lock in the cache).
# Both roots share one build lock, so the two preparations take turns.
IMAGE_PREPARE_LOG ?= $(IMAGE_CACHE).prepare.log
NSPAWN_PREPARE_LOG ?= $(IMAGE_CACHE).prepare-nspawn.log

test: venv lint tflite-venv mosquitto systemd-tools image-tools wheel-check
	@mkdir -p "$$(dirname $(IMAGE_CACHE))"; \
	$(PY) -m tests.image.imagetest --cache $(IMAGE_CACHE) --prepare > $(IMAGE_PREPARE_LOG) 2>&1 & prep=$$!; \
	$(PY) -m tests.image.nspawntest --cache $(IMAGE_CACHE) --prepare > $(NSPAWN_PREPARE_LOG) 2>&1 & prep2=$$!; \
	trap 'kill $$prep $$prep2 2>/dev/null' EXIT; \
	FIELDNODE_TEST_BACKEND=litert $(PY) -m pytest -q $(PYTEST_ARGS) && \
	FIELDNODE_TEST_BACKEND=tflite $(TFLITE_VENV)/bin/python -m pytest -q -m runtime $(PYTEST_ARGS) tests/runtime && \
	$(MAKE) --no-print-directory py313-test && \
	{ wait $$prep && wait $$prep2 || { cat $(IMAGE_PREPARE_LOG) $(NSPAWN_PREPARE_LOG); exit 1; }; } && \
	cat $(IMAGE_PREPARE_LOG) $(NSPAWN_PREPARE_LOG) && \
	$(MAKE) --no-print-directory image-test && \
	$(MAKE) --no-print-directory nspawn-test

# The lint gate: ruff with the small rule set stated in pyproject.toml ([tool.ruff.lint]); and the modules written
# since the gate exists must annotate every function's arguments and return type (ANNOTATED grows, never shrinks).
ANNOTATED ?= device/linux.py device/cliargs.py device/configfiles.py device/link/mqttclient.py device/link/session.py \
	device/link/cmdargs.py device/diag/runner.py device/runtime/launch.py tools/diag/report.py tools/provision_renew.py \
	tests/waiting.py tests/hostpaths.py power/planner.py power/scenarios.py drivers/powermeter.py \
	drivers/sim/kernelgov.py drivers/sim/solar.py drivers/sim/workload.py device/threads.py tests/benchmarks/summary.py \
	device/link/groups.py device/link/presence.py device/agent/summary.py power/harvest.py \
	tools/fleet/states.py tools/fleet/where.py tools/fleet/status.py tools/fleet/groupsend.py tools/fleet/cli.py \
	tests/fleet/boards.py tests/fleet/conftest.py
lint: venv
	$(VENV)/bin/ruff check device drivers power tools tests
	$(VENV)/bin/ruff check --select ANN001,ANN201,ANN202 $(ANNOTATED)

# Every benchmark runs, even after one fails; each one's stdout (its JSON lines) and exit status are kept in
# BENCH_OUT, and tests/benchmarks/summary.py ends with one table of every figure, its target and met / not met.
# make bench fails when a benchmark did (a crash, outputs that differ, a scenario that could not run), not when a
# figure misses its target.
BENCH_OUT ?= build/bench
bench: venv
	@mkdir -p $(BENCH_OUT) && rm -f $(BENCH_OUT)/bench_*.jsonl $(BENCH_OUT)/bench_*.rc && \
	for b in tests/benchmarks/bench_*.py; do n=$$(basename $$b .py); echo "== $$b"; \
		{ $(PY) $$b; echo $$? > $(BENCH_OUT)/$$n.rc; } | tee $(BENCH_OUT)/$$n.jsonl; done; \
	echo; $(PY) tests/benchmarks/summary.py $(BENCH_OUT)/bench_*.jsonl

# Dev-only: regenerate the shipped models (needs TensorFlow, in its own venv).
models:
	@test -x .venv-models/bin/python || $(PYTHON) -m venv .venv-models
	.venv-models/bin/python -m pip install -q -e '.[models]'
	.venv-models/bin/python tools/make_models.py

clean:
	rm -rf $(VENV) $(TFLITE_VENV) $(PY313_VENV) .venv-models build *.egg-info .pytest_cache
