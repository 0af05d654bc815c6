# Baton: `make run` starts everything on this machine, `make test` runs the whole suite.
# Needs only Python 3.11 and make: uv is installed with pip if it is missing.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

HOST ?= 127.0.0.1
PORT ?= 8000

# `pip install --user` puts uv in the user base's bin/ (usually ~/.local/bin), often not on PATH.
USER_BIN := $(shell python3 -c 'import site; print(site.USER_BASE)' 2>/dev/null)/bin
export PATH := $(USER_BIN):$(HOME)/.local/bin:$(PATH)
export UV_COMPILE_BYTECODE := 1

.PHONY: run test lint sync uv chaos bench

# Debian's python refuses a plain `--user` install (PEP 668, hence the second try); inside a
# virtualenv `--user` is refused but installing into it is right (the third).
uv:
	@if ! command -v uv >/dev/null 2>&1; then \
		echo "uv not found: installing it with pip (user install)"; \
		python3 -m pip install --user uv \
			|| python3 -m pip install --user --break-system-packages uv \
			|| python3 -m pip install uv \
			|| { echo "Could not install uv with pip. Install python3-pip, or uv itself:" \
				"https://docs.astral.sh/uv/getting-started/installation/" >&2; exit 1; }; \
	fi

# var/ (git-ignored) holds the SQLite file, the Redis socket and beat's schedule.
sync: uv
	uv sync --frozen
	mkdir -p "$${BATON_VAR_DIR:-var}"

run: sync
	uv run python manage.py migrate --noinput
	uv run python manage.py load_demo
	uv run python manage.py seed_prices
	uv run python manage.py ensure_admin --url http://$(HOST):$(PORT)/accounts/login/
	uv run python manage.py runstack --host $(HOST) --port $(PORT)

test: sync
	uv run pytest

lint: sync
	uv run ruff check .
	uv run ruff format --check .

# Fault run of docs/reliability.md: PostgreSQL when DATABASE_URL is set (creates and drops its own
# baton_chaos_<id> database there), else a SQLite file; always its own redis-server.
chaos: sync
	uv run python -m bench.chaos $(CHAOS_ARGS)

# docs/benchmarks.md; BENCH_ARGS="--quick" for a smoke run.
bench: sync
	uv run python -m bench.bench $(BENCH_ARGS)
