"""The brain of the offline `scripted/` provider: deterministic, plausible answers, no network.

`answer()` is a pure function of the request, so the LiteLLM provider (`runs/llm.py`) and the fake
OpenAI-compatible server of the test suite (`tests/fake_llm.py`) answer alike. The engine's prompts
steer it with these conventions, checked in this order:

1. Tools offered and no tool result since the last user message: one call of the first offered tool,
   its arguments built from the tool's JSON schema and the task's topic.
2. JSON requested (`response_format` of type json_schema / json_object, or a system or user message
   with a line starting `Respond with JSON matching this schema:` followed by the schema): JSON text
   that validates against the schema.
3. A line `CHOOSE ONE OF: a | b | c` in the last user message: exactly one option, the first one not
   listed on a line `ALREADY CHOSEN: x | y`, else the last option.
4. A line `ROUND n` (n >= 2) and the phrase `start your reply with AGREE`: a reply starting "AGREE".
5. Otherwise a few paragraphs of Markdown about the topic, shaped by the role in the system prompt.

A user message containing `SCRIPTED_FAIL: permanent` (or `transient`) raises ScriptedFailure, so
engine tests can provoke provider errors through the real call path.
"""

import hashlib
import json
import math
import re
from decimal import Decimal
from typing import Any

# Per 1M tokens. Demo runs cost something, so cost reports are never empty.
PRICE_PER_1M = {"input": Decimal("0.50"), "output": Decimal("1.50"), "cached": Decimal("0.25")}

JSON_SCHEMA_MARKER = "Respond with JSON matching this schema:"
_CHOOSE = re.compile(r"^[ \t]*CHOOSE ONE OF:[ \t]*(.*)$", re.MULTILINE)
_ALREADY = re.compile(r"^[ \t]*ALREADY CHOSEN:[ \t]*(.*)$", re.MULTILINE)
_ROUND = re.compile(r"^[ \t]*ROUND[ \t]+(\d+)\b", re.MULTILINE)
_AGREE_PHRASE = re.compile(r"start your reply with AGREE", re.IGNORECASE)
_FAIL = re.compile(r"SCRIPTED_FAIL:\s*(permanent|transient)")
_TOPIC_LINE = re.compile(
    r"^[ \t]*(?:topic|subject|question)[ \t]*[:=][ \t]*(.+)$", re.IGNORECASE | re.MULTILINE
)
_LEAD_IN = re.compile(
    r"^(?:please\s+)?(?:(?:do\s+)?research|investigate|analy[sz]e|summari[sz]e|explain|describe|"
    r"review|critique|draft|outline|classify|write(?:\s+(?:a|an|the))?(?:\s+short)?"
    r"(?:\s+(?:report|summary|post|article|memo|brief))?|work\s+on|find(?:\s+facts)?|"
    r"tell\s+me|answer|discuss|debate|compare)\b(?:\s+(?:about|on|of|for|into))?\s*",
    re.IGNORECASE,
)
# "the findings about X" -> "X": later pipeline steps talk about earlier steps' output.
_OUTPUT_OF = re.compile(
    r"^(?:the\s+|these\s+|our\s+)?(?:findings|results|research|analysis|notes|answers?|"
    r"draft|report)\s+(?:about|on|of|for|into)\s+",
    re.IGNORECASE,
)
_LABELS = {"task", "context", "instructions", "input", "background", "question", "prompt"}
_MARKER_LINE = re.compile(
    r"^\s*(?:CHOOSE ONE OF:|ALREADY CHOSEN:|ROUND\s+\d|SCRIPTED_FAIL:|"
    + re.escape(JSON_SCHEMA_MARKER)
    + r")"
)


class ScriptedFailure(Exception):
    """A failure asked for with the SCRIPTED_FAIL marker."""

    def __init__(self, transient: bool, message: str):
        super().__init__(message)
        self.transient = transient
        self.message = message
        self.status_code = 503 if transient else 400


# --- public helpers -------------------------------------------------------------------------


def answer(
    messages: list[dict], tools: list[dict] | None = None, response_format: dict | None = None
) -> tuple[str, list[dict]]:
    """The reply to a chat request: (text, tool_calls as [{"id", "name", "arguments": dict}]).

    Deterministic: the same request always gets the same answer (no randomness, no clock).
    """
    _check_fail_marker(messages)
    last_user = _last_user_text(messages)
    topic = topic_of(messages)
    tool_results = _tool_results_since_last_user(messages)

    if tools and not tool_results:
        tool = _function_of(tools[0])
        arguments = _tool_arguments(tool.get("parameters") or {}, topic)
        digest = _digest(
            tool.get("name", ""), json.dumps(arguments, sort_keys=True), str(len(messages))
        )
        return "", [
            {"id": f"call_{digest[:16]}", "name": tool.get("name", ""), "arguments": arguments}
        ]

    schema = _requested_schema(messages, response_format)
    if schema is not None:
        value = example_for(schema, topic=topic, root=schema)
        return json.dumps(value, ensure_ascii=False), []

    choose = _CHOOSE.search(last_user)
    if choose:
        return _choose(choose.group(1), last_user), []

    round_match = _ROUND.search(last_user)
    if round_match and int(round_match.group(1)) >= 2 and _AGREE_PHRASE.search(last_user):
        return (
            f"AGREE. The positions on {topic} have converged: the remaining differences are "
            "matters of emphasis, not substance, and the shared conclusion can go to the judge.",
            [],
        )

    return _prose(messages, topic, tool_results), []


def count_tokens(text: str) -> int:
    """About 4/3 tokens per word, as English text averages with BPE tokenisers."""
    words = len(text.split())
    return math.ceil(words * 4 / 3)


def usage_for(
    messages: list[dict], tools: list[dict] | None, text: str, tool_calls: list[dict]
) -> dict:
    """Deterministic token counts for a request and its answer."""
    prompt = sum(count_tokens(_content_text(m)) + 3 for m in messages)
    if tools:
        prompt += count_tokens(json.dumps(tools))
    completion = count_tokens(text) + sum(
        count_tokens(c["name"] + " " + json.dumps(c["arguments"])) for c in tool_calls
    )
    completion = max(completion, 1)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cached_tokens": 0,
    }


def chunks(text: str, words_per_chunk: int = 3) -> list[str]:
    """Split text into small pieces that concatenate back to it, for streaming."""
    pieces = re.findall(r"\S+\s*|\s+", text)
    return [
        "".join(pieces[i : i + words_per_chunk]) for i in range(0, len(pieces), words_per_chunk)
    ]


def topic_of(messages: list[dict]) -> str:
    """What the task is about, from the last user message (a `Topic:` line wins)."""
    text = _last_user_text(messages)
    explicit = _TOPIC_LINE.search(text)
    if explicit:
        return _trim(explicit.group(1))
    for line in text.splitlines():
        line = line.strip().lstrip("#>*- ").strip()
        if not line or _MARKER_LINE.match(line) or line[0] in "{[":
            continue
        if line.endswith(":") or line.lower() in _LABELS:
            continue  # "Context from earlier steps:", "# Task": labels, not the task
        line = _LEAD_IN.sub("", line, count=1).strip()
        line = _OUTPUT_OF.sub("", line, count=1).strip()
        if line:
            return _trim(line)
    return "the task"


def example_for(
    schema: Any,
    name: str = "",
    topic: str = "the task",
    root: Any = None,
    index: int = 0,
    depth: int = 0,
) -> Any:
    """A value that validates against `schema`, with strings derived from the topic."""
    root = schema if root is None else root
    if not isinstance(schema, dict) or depth > 12:
        return None
    if "$ref" in schema:
        return example_for(_resolve_ref(root, schema["$ref"]), name, topic, root, index, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            options = [
                o for o in schema[key] if not (isinstance(o, dict) and o.get("type") == "null")
            ]
            return example_for((options or schema[key])[0], name, topic, root, index, depth + 1)
    if schema.get("allOf"):
        merged: dict = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            part = _resolve_ref(root, part["$ref"]) if "$ref" in part else part
            merged.setdefault("properties", {}).update(part.get("properties", {}))
            merged["required"] = [*merged.get("required", []), *part.get("required", [])]
            merged.setdefault("type", part.get("type"))
        return example_for(merged, name, topic, root, index, depth + 1)

    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"

    if kind == "object":
        properties = schema.get("properties") or {}
        return {
            key: example_for(sub, key, topic, root, 0, depth + 1) for key, sub in properties.items()
        }
    if kind == "array":
        count = max(2, schema.get("minItems", 0))
        if "maxItems" in schema:
            count = min(count, schema["maxItems"])
        items = schema.get("items") or {"type": "string"}
        if isinstance(items, list):  # tuple validation (draft 4-7)
            return [example_for(s, name, topic, root, i, depth + 1) for i, s in enumerate(items)]
        return [
            example_for(items, _singular(name), topic, root, i, depth + 1) for i in range(count)
        ]
    if kind in ("integer", "number"):
        return _number(schema, integer=kind == "integer")
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return _string(schema, name, topic, index)


# --- rules ----------------------------------------------------------------------------------


def _check_fail_marker(messages: list[dict]) -> None:
    for message in messages:
        if message.get("role") != "user":
            continue
        found = _FAIL.search(_content_text(message))
        if found:
            transient = found.group(1) == "transient"
            raise ScriptedFailure(
                transient,
                "scripted provider: service unavailable (SCRIPTED_FAIL: transient)"
                if transient
                else "scripted provider: invalid request (SCRIPTED_FAIL: permanent)",
            )


def _choose(options_text: str, last_user: str) -> str:
    options = [o.strip() for o in options_text.split("|") if o.strip()]
    if not options:
        return ""
    already_match = _ALREADY.search(last_user)
    already = set()
    if already_match:
        already = {o.strip().lower() for o in already_match.group(1).split("|") if o.strip()}
    for option in options:
        if option.lower() not in already:
            return option
    return options[-1]


def _requested_schema(messages: list[dict], response_format: dict | None) -> dict | None:
    """The JSON schema the caller wants (a small one for "any JSON object"), None for text."""
    if isinstance(response_format, dict):
        if response_format.get("type") == "json_schema":
            spec = response_format.get("json_schema") or {}
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if isinstance(schema, dict):
                return schema
        in_prompt = _schema_in_prompt(messages)
        if response_format.get("type") in ("json_schema", "json_object"):
            return in_prompt if in_prompt is not None else _ANY_OBJECT
    return _schema_in_prompt(messages)


_ANY_OBJECT = {
    "type": "object",
    "properties": {"topic": {"type": "string"}, "answer": {"type": "string"}},
}


def _schema_in_prompt(messages: list[dict]) -> dict | None:
    found = None
    for message in messages:
        if message.get("role") not in ("system", "user"):
            continue
        text = _content_text(message)
        start = 0
        while True:
            position = text.find(JSON_SCHEMA_MARKER, start)
            if position < 0:
                break
            start = position + len(JSON_SCHEMA_MARKER)
            line_start = text.rfind("\n", 0, position) + 1
            if text[line_start:position].strip():
                continue  # the marker must start its line
            rest = text[start:].lstrip()
            if rest.startswith("```"):
                rest = rest.split("\n", 1)[1] if "\n" in rest else ""
            try:
                value, _ = json.JSONDecoder().raw_decode(rest)
            except ValueError:
                continue
            if isinstance(value, dict):
                found = value
    return found


def _tool_arguments(parameters: dict, topic: str) -> dict:
    """Required properties always; well-known optional text properties too, so a call reads
    naturally (an email gets a subject and a body)."""
    properties = parameters.get("properties") or {}
    required = set(parameters.get("required") or [])
    arguments = {}
    for key, sub in properties.items():
        if key not in required and key not in _KNOWN_TEXT_ARGS:
            continue
        sub = sub if isinstance(sub, dict) else {}
        arguments[key] = _tool_argument(key, sub, topic, parameters)
    return arguments


_KNOWN_TEXT_ARGS = {"query", "text", "title", "body", "subject", "to", "expression"}


def _tool_argument(key: str, schema: dict, topic: str, root: dict) -> Any:
    if "$ref" in schema:
        schema = _resolve_ref(root, schema["$ref"])
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type", "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "string":
        lowered = key.lower()
        if lowered == "to" or "email" in lowered:
            return "team@example.com"
        if lowered == "expression":
            return "6*7"
        if lowered in ("title", "subject"):
            return _title(topic)
        if lowered == "body":
            return f"A short note on {topic}: the main points, the open questions and next steps."
        return _fit(topic, schema)
    if kind in ("integer", "number"):
        return _number(schema, integer=kind == "integer")
    if kind == "boolean":
        return False
    if kind == "array":
        return []
    if kind == "object":
        return {}
    return None


_FINDINGS = [
    "{T} matters most where work is repeated at scale: small gains compound quickly.",
    "The central trade-off in {t} is speed against reliability; mature teams measure both.",
    "Costs in {t} are driven by volume, so caching and reuse pay off before anything else.",
    "Failures in {t} tend to come from unclear ownership rather than from the technology.",
    "Practitioners recommend starting {t} with one narrow use case and a clear success metric.",
    "Evidence on {t} is strongest for well-defined tasks and weakest for open-ended ones.",
    "Regulation and auditability increasingly shape how {t} is adopted in larger organisations.",
]


def _prose(messages: list[dict], topic: str, tool_results: list[tuple[str, str]]) -> str:
    role = _role_of(messages)
    seed = int(_digest(json.dumps(messages, sort_keys=True, default=str))[:8], 16)
    picks = [_FINDINGS[(seed + i * 3) % len(_FINDINGS)] for i in range(4)]
    facts = [p.format(t=topic, T=_capitalised(topic)) for p in picks]
    evidence = ""
    if tool_results:
        evidence = "\n\n" + "\n".join(
            f"- From `{name}`: {_one_line(content, 200)}" for name, content in tool_results
        )

    if role == "researcher":
        bullets = "\n".join(f"- {fact}" for fact in facts)
        return (
            f"## Findings on {topic}\n\n{bullets}{evidence}\n\n"
            f"These findings give a starting point for a deeper analysis of {topic}."
        )
    if role == "analyst":
        return (
            f"## Analysis of {topic}\n\n{facts[0]} {facts[1]}\n\n"
            f"Weighing these points, the strongest case for {topic} rests on measurable outcomes, "
            f"while the main risk is cost growing faster than value.{evidence}\n\n"
            f"**Recommendation:** proceed with {topic} in a limited pilot, track cost and quality "
            "weekly, and expand only when both stay within target."
        )
    if role == "writer":
        return (
            f"# {_title(topic)}\n\n{facts[0]} This report summarises what we know and what to do "
            f"next.\n\n## Key points\n\n- {facts[1]}\n- {facts[2]}{evidence}\n\n## Conclusion\n\n"
            f"{_capitalised(topic)} is worth pursuing with clear ownership, a narrow first scope "
            "and a budget that is reviewed as results come in."
        )
    if role == "critic":
        return (
            f"## Critique on {topic}\n\nThe answer is broadly sound, but it underplays one point: "
            f"{facts[1][0].lower() + facts[1][1:]}\n\nIt would be stronger with a concrete metric "
            f"and a note on what happens when {topic} fails.{evidence}"
        )
    if role == "judge":
        return (
            f"## Verdict on {topic}\n\nThe answers agree on the essentials. {facts[0]} "
            f"The best-supported position is to adopt {topic} gradually.{evidence}"
        )
    return (
        f"{facts[0]}\n\n{facts[1]} {facts[2]}{evidence}\n\n"
        f"In short: {topic} deserves a focused, measured first step."
    )


_ROLES = [
    ("researcher", "research"),
    ("analyst", "analy"),
    ("writer", "writ"),
    ("writer", "editor"),
    ("critic", "critic"),
    ("critic", "review"),
    ("critic", "debat"),
    ("judge", "judge"),
]


def _role_of(messages: list[dict]) -> str:
    """The role named earliest in the system prompt (goals often mention other roles' work)."""
    system = " ".join(_content_text(m) for m in messages if m.get("role") == "system").lower()
    hits = [(system.find(word), role) for role, word in _ROLES if word in system]
    return min(hits)[1] if hits else "assistant"


# --- small helpers --------------------------------------------------------------------------


def _content_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI multi-part content
        return "\n".join(
            p.get("text", "")
            for p in content
            if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def _last_user_text(messages: list[dict]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return _content_text(message)
    return ""


def _tool_results_since_last_user(messages: list[dict]) -> list[tuple[str, str]]:
    names = {}
    results = []
    for message in messages:
        role = message.get("role")
        if role == "user":
            results = []
        elif role == "assistant":
            for call in message.get("tool_calls") or []:
                function = call.get("function") or {}
                names[call.get("id")] = function.get("name") or call.get("name") or "tool"
        elif role == "tool":
            name = message.get("name") or names.get(message.get("tool_call_id"), "tool")
            results.append((name, _content_text(message)))
    return results


def _function_of(tool: dict) -> dict:
    return tool.get("function", tool) if isinstance(tool, dict) else {}


def _resolve_ref(root: Any, ref: str) -> dict:
    if not ref.startswith("#"):
        return {}
    node = root
    for part in ref.lstrip("#").strip("/").split("/"):
        if not part:
            continue
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return {}
        node = node[part]
    return node if isinstance(node, dict) else {}


def _number(schema: dict, integer: bool) -> int | float:
    value: float = 1
    if "minimum" in schema and value < schema["minimum"]:
        value = schema["minimum"]
    if (
        "exclusiveMinimum" in schema
        and isinstance(schema["exclusiveMinimum"], int | float)
        and value <= schema["exclusiveMinimum"]
    ):
        value = schema["exclusiveMinimum"] + 1
    if "maximum" in schema and value > schema["maximum"]:
        value = schema["maximum"]
    if (
        "exclusiveMaximum" in schema
        and isinstance(schema["exclusiveMaximum"], int | float)
        and value >= schema["exclusiveMaximum"]
    ):
        value = schema["exclusiveMaximum"] - (1 if integer else 0.5)
    if integer:
        return int(math.ceil(value))
    return value


_SENTENCE_KEYS = (
    "summary",
    "answer",
    "text",
    "body",
    "content",
    "description",
    "reason",
    "rationale",
    "explanation",
    "report",
    "critique",
    "analysis",
    "finding",
    "point",
    "recommendation",
    "conclusion",
    "verdict",
    "argument",
    "note",
)


def _string(schema: dict, name: str, topic: str, index: int) -> str:
    lowered = name.lower()
    fmt = schema.get("format", "")
    if fmt == "email" or "email" in lowered:
        value = "team@example.com"
    elif fmt == "date":
        value = "2024-01-01"
    elif fmt == "date-time":
        value = "2024-01-01T00:00:00Z"
    elif fmt in ("uri", "url") or lowered in ("url", "uri", "link", "source"):
        value = f"https://example.com/{_slug(topic)}"
    elif lowered in ("id", "slug", "key"):
        value = _slug(topic) + (f"-{index + 1}" if index else "")
    elif lowered in ("title", "headline", "name", "subject", "heading"):
        value = _title(topic) + (f" ({index + 1})" if index else "")
    elif lowered in ("topic", "query", "question"):
        value = topic
    elif any(key in lowered for key in _SENTENCE_KEYS) or not lowered:
        value = _FINDINGS[index % len(_FINDINGS)].format(t=topic, T=_capitalised(topic))
    else:
        value = f"{lowered.replace('_', ' ').capitalize()} for {topic}"
        if index:
            value += f" ({index + 1})"
    return _fit(value, schema)


def _fit(value: str, schema: dict) -> str:
    minimum = schema.get("minLength", 0)
    if len(value) < minimum:
        value = value + "." * (minimum - len(value))
    if "maxLength" in schema:
        value = value[: schema["maxLength"]]
    return value


def _singular(name: str) -> str:
    return name[:-1] if name.endswith("s") and len(name) > 1 else name


def _trim(text: str, limit: int = 80) -> str:
    text = " ".join(text.split()).strip(" .:;,!?\"'`")
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:")
    return text or "the task"


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def _title(text: str) -> str:
    small = {"a", "an", "and", "as", "at", "for", "in", "of", "on", "or", "the", "to", "with"}
    words = text.split()
    return (
        " ".join(
            w if (i and w.lower() in small) or not w[:1].islower() else w.capitalize()
            for i, w in enumerate(words)
        )
        or "Report"
    )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "item"


def _one_line(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
