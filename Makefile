# LGT-ETL developer entry points. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRAS ?= airflow,dev,openlineage
# Re-install whenever the declared dependencies or the pinned constraints change.
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints/py311.txt | sha256sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: install demo test lint format services browser bench clean

$(STAMP): pyproject.toml constraints/py311.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet --constraint constraints/py311.txt -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip check
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

## Run the whole pipeline on the bundled sample: local store, SQLite, the simulator.
demo: install
	$(BIN)/lgt demo

## Start what the tests need, then run the whole suite.
test: install services browser
	$(BIN)/pytest $(PYTEST_ARGS)

## PostgreSQL 15 on 127.0.0.1:5432 (the tests create and drop their own databases) and Redis on
## 127.0.0.1:6379 (the Celery broker of tests/test_celery.py; an in-memory queue, nothing saved).
services:
	@pg_isready -q -h 127.0.0.1 -p 5432 || { \
	  echo "starting PostgreSQL"; \
	  pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start; \
	  for i in $$(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done; }
	@pg_isready -h 127.0.0.1 -p 5432
	@redis-cli -h 127.0.0.1 -p 6379 ping > /dev/null 2>&1 || { \
	  echo "starting Redis"; \
	  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
	    --dir /var/lib/redis --logfile /var/log/redis/ci.log; \
	  for i in $$(seq 1 30); do redis-cli -h 127.0.0.1 -p 6379 ping > /dev/null 2>&1 && break; sleep 1; done; }
	@redis-cli -h 127.0.0.1 -p 6379 ping

## Debian's chromium for the releases page browser test (Playwright drives this binary and
## never downloads a browser of its own).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@test -x /usr/bin/chromium || { \
	  echo "installing chromium"; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }
	@/usr/bin/chromium --version 2>/dev/null

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check lgt_ops dags plugins

format: install
	$(BIN)/ruff format lgt_ops dags plugins
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python bench/endpoint_throughput.py

clean:
	rm -rf .lgt .pytest_cache .ruff_cache build *.egg-info
