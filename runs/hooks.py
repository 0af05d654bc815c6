"""The one way the engine asks a human: a function the approvals app registers at start-up.

`runs` never imports `approvals`; `approvals` registers `open_request(step, kind, title,
payload, context, ...)` here, and calls `runs.engine.apply_decision` when decided.
"""

from collections.abc import Callable

_approval_requester: Callable | None = None


def register_approval_requester(function: Callable) -> None:
    global _approval_requester
    _approval_requester = function


def request_approval(**kwargs):
    if _approval_requester is None:
        raise RuntimeError("No approval requester registered (is the approvals app installed?)")
    return _approval_requester(**kwargs)
