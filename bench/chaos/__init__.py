"""The chaos run behind `make chaos` (`python -m bench.chaos`): real workers, a real Redis and
database, the fake LLM, and faults injected while runs execute. See docs/reliability.md."""
