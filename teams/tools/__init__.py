"""The allow-list of Python callables a Tool row may name as its entrypoint.

A tool function takes the validated arguments and a ToolContext and returns JSON-able data.
Side-effect tools must honour `ctx.idempotency_key`: the same key never acts twice.
"""

from collections.abc import Callable
from dataclasses import dataclass

from teams.tools import builtin


@dataclass(frozen=True)
class ToolContext:
    run_id: int
    step_id: int
    idempotency_key: str


REGISTRY: dict[str, Callable[[dict, ToolContext], object]] = {
    "baton.calculator": builtin.calculator,
    "baton.word_count": builtin.word_count,
    "baton.search_notes": builtin.search_notes,
    "baton.publish_report": builtin.publish_report,
    "baton.send_email": builtin.send_email,
    "baton.flaky": builtin.flaky,
}

choices = [(name, name) for name in REGISTRY]


def call(entrypoint: str, args: dict, ctx: ToolContext) -> object:
    try:
        function = REGISTRY[entrypoint]
    except KeyError:
        raise LookupError(f"tool entrypoint {entrypoint!r} is not in the registry") from None
    return function(args, ctx)
