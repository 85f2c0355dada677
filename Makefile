# The two commands of README.md: `make demo` and `make test`. Each installs what it needs first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip install --disable-pip-version-check -q
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install install-test demo test lint

# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
install:
	$(PIP) torch==2.13.0
	$(PIP) -e .

install-test:
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'

# Demo step (explicitly named): writes torchtitan-layout checkpoints under outputs/, then sweeps.
demo: install
	$(PYTHON) -m demo --out outputs
	$(PYTHON) convert.py -m experiment=debug,500M,debug_pretrained

# The SLURM tests need the one-node cluster that launch/slurm_cluster.sh brings up (as root);
# tests/test_rank_exit.py schedules a rank's threads with gdb.
test: install-test
	bash launch/slurm_cluster.sh up
	command -v gdb >/dev/null || $(SUDO) sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends gdb >/dev/null' \
		|| echo "gdb could not be installed: tests/test_rank_exit.py skips (fails under CI=true)"
	$(PYTHON) -m pytest -v --durations=15

lint:
	ruff check . && ruff format --check .
