# Entry points of the quick start. Each target first makes sure .venv is complete
# (tools/setup_env.sh installs only what is missing), then runs with that environment.
VENV_PYTHON := $(CURDIR)/.venv/bin/python

.PHONY: setup test test-slow quickstart

setup:
	bash tools/setup_env.sh

# The default test run: CPU only, a few minutes. Slow tests are kept out (see test-slow).
test: setup
	$(VENV_PYTHON) -m pytest

test-slow: setup
	$(VENV_PYTHON) -m pytest -m slow

# The main job: train the tiny model on the real sample images, then evaluate it.
quickstart: setup
	PYTHON=$(VENV_PYTHON) sh run_train.sh
