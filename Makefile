# The two entry points a newcomer needs: `make deploy` and `make test`. Both set up first.
PY := .venv/bin/python
TARGET ?= cortex-m7
# Test files run on this many processes (pytest-xdist); a file's tests share one, so its
# module fixtures (trained models, builds) are made once.
TEST_WORKERS ?= 2

.PHONY: setup test test-all deploy bench lint clean

setup:
	@bash tools/setup.sh

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

test-all: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests -m "slow or not slow"

deploy: setup
	.venv/bin/edgeprune deploy --target $(TARGET) --out build/deploy --force

bench: setup
	$(PY) -m bench.run

clean:
	rm -rf build .cache bench/work
