"""Built-in tools. Deterministic and offline, so demos and tests behave the same everywhere."""

import ast
import math
import operator

from django.db import IntegrityError, transaction

_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.Mod: operator.mod,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}

NOTES = {
    "agents": "Multi-agent systems split a task between specialised LLM agents with roles.",
    "durability": "Durable execution persists every step so a crash resumes instead of restarting.",
    "cost": "LLM cost is tokens times price; cached prompt tokens are billed at a lower rate.",
    "approval": "Human-in-the-loop approval gates irreversible actions behind a person's decision.",
    "celery": "Celery is a distributed task queue; acks_late redelivers tasks of dead workers.",
}


def calculator(args: dict, ctx) -> dict:
    """Evaluate arithmetic (numbers and + - * / ** %) without eval."""
    expression = str(args.get("expression", ""))
    if len(expression) > 200:
        raise ValueError("expression longer than 200 characters")

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, int | float)
            and not (isinstance(node.value, bool))
        ):
            if isinstance(node.value, float) and not math.isfinite(node.value):
                raise ValueError(f"{node.value} is not a finite number")
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 100 or abs(left) > 1e100):
                raise ValueError("exponent too large")
            value = _OPERATORS[type(node.op)](left, right)
            if not isinstance(value, complex) and abs(value) > 1e300:
                raise ValueError("result too large")
            return value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](walk(node.operand))
        raise ValueError("only numbers and + - * / ** % are allowed")

    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, RecursionError) as exc:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from exc
    try:
        result = walk(tree)
    except (ZeroDivisionError, OverflowError, RecursionError) as exc:
        raise ValueError(f"cannot compute {expression!r}: {exc}") from exc
    if isinstance(result, complex) or (isinstance(result, float) and not math.isfinite(result)):
        raise ValueError(f"{expression!r} has no finite real result")
    return {"expression": expression, "result": result}


def word_count(args: dict, ctx) -> dict:
    text = str(args.get("text", ""))
    return {"words": len(text.split()), "characters": len(text)}


def search_notes(args: dict, ctx) -> dict:
    """Look a topic up in Baton's small offline knowledge base."""
    query = str(args.get("query", "")).lower()
    hits = [
        {"title": key, "snippet": text}
        for key, text in NOTES.items()
        if key in query or any(word in text.lower() for word in query.split() if len(word) > 3)
    ]
    return {"query": query, "results": hits[:3] or [{"title": "none", "snippet": "No notes."}]}


def _once(ctx, tool: str, payload: dict, result: dict) -> dict:
    """Record a side effect under its idempotency key; a repeat returns the first result."""
    from teams.models import OutboxMessage

    try:
        with transaction.atomic():
            OutboxMessage.objects.create(
                idempotency_key=ctx.idempotency_key, tool=tool, payload=payload, result=result
            )
    except IntegrityError:
        return OutboxMessage.objects.get(idempotency_key=ctx.idempotency_key).result
    return result


def publish_report(args: dict, ctx) -> dict:
    title = str(args.get("title", "Report"))[:200]
    body = str(args.get("body", ""))
    return _once(
        ctx,
        "publish_report",
        {"title": title, "body": body},
        {"published": True, "title": title, "key": ctx.idempotency_key},
    )


def send_email(args: dict, ctx) -> dict:
    to = str(args.get("to", ""))
    if "@" not in to:
        raise ValueError(f"not an email address: {to!r}")
    subject = str(args.get("subject", ""))[:200]
    return _once(
        ctx,
        "send_email",
        {"to": to, "subject": subject, "body": str(args.get("body", ""))},
        {"sent": True, "to": to, "key": ctx.idempotency_key},
    )


def flaky(args: dict, ctx) -> dict:
    """Fails while `fail` is true: exercises retries and the circuit breaker."""
    if args.get("fail", True):
        raise RuntimeError("flaky tool failed on purpose")
    return {"ok": True}
