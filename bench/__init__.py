"""Baton's benchmarks and stress runs against the real stack (PostgreSQL or SQLite, Redis, Celery
workers, Daphne, the fake LLM server). `make bench` runs bench/bench.py; see docs/benchmarks.md."""
