# The two things to do on a fresh Debian machine (as root): `make demo` and `make test`.
# Both run deploy/setup-debian.sh first, which installs only what is missing.

PY := .venv/bin/python

.PHONY: setup demo test test-fast worker bench

setup:
	@bash deploy/setup-debian.sh

# A real image build on this machine: base OS, build VM over SSH, VHD, a gallery in three regions.
demo: setup
	@$(PY) examples/demo.py

# The whole suite: unit, workflows (real Temporal dev server), local (real builds), azure (ARM emulator).
test: setup
	@$(PY) -m pytest -q -ra --durations=15

# Without the real local builds: seconds, not minutes.
test-fast: setup
	@$(PY) -m pytest -q -ra -m "not local"

worker: setup
	@$(PY) worker.py --dev

bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b; done
