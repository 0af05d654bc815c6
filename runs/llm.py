"""The LLM seam: the only module that imports litellm (or the OpenAI SDK).

One call, `complete()`, returns text, tool calls, usage, cost, model and latency, or raises one
error type, LLMError, that says whether trying again can help. The clients' own retries are off:
the engine retries, records every attempt and falls back to other models.

Models are LiteLLM model strings; keys come from the environment as LiteLLM reads them. An
`openai/<name>` model with an `api_base` talks to any OpenAI-compatible server (vLLM, llama.cpp,
Ollama, the test suite's fake server) through the OpenAI SDK directly, one cached client per
server and key: LiteLLM wraps that same SDK and added about 6 ms of CPU to each call and 40 to
60 ms to each streamed one (measured against the fake server), more than the rest of a durable
step costs. Every other model goes through LiteLLM. `scripted/<name>` is Baton's offline
provider (a LiteLLM CustomLLM whose answers come from `runs/scripted.py`), priced so demo runs
are never free.

Importing this module costs about three seconds (litellm), so import it only where a call is made.
"""

import functools
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import NamedTuple

# LiteLLM fetches its price map over the network at import unless told otherwise.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

import litellm  # noqa: E402
import openai  # noqa: E402
from litellm._internal_context import is_internal_call  # noqa: E402
from litellm.llms.custom_llm import CustomLLM  # noqa: E402
from litellm.types.utils import (  # noqa: E402
    ChatCompletionMessageToolCall,
    Function,
    Message,
    ModelResponse,
    Usage,
)

from runs import scripted  # noqa: E402

# No "Provider List: https://..." banners printed to stdout on every lookup miss.
litellm.suppress_debug_info = True

_PER_MILLION = Decimal(1_000_000)
_COST_PLACES = Decimal("1e-8")  # as UsageRecord.cost stores it
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]", "0.0.0.0")


@dataclass
class LLMResult:
    text: str
    tool_calls: list[dict]  # [{"id", "name", "arguments": dict}]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    total_tokens: int
    cost: Decimal  # from LiteLLM's bundled price map; 0 when the model is not in it
    model: str  # the model string that was asked for, the key prices and reports use
    latency_ms: int
    finish_reason: str
    response_model: str = field(default="")  # what the provider says answered, if it says

    def to_dict(self) -> dict:
        """JSON-able, for storing the call so a redelivered step can replay it."""
        data = asdict(self)
        data["cost"] = str(self.cost)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "LLMResult":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["cost"] = Decimal(str(known.get("cost", "0")))
        return cls(**known)


class LLMError(Exception):
    """A failed LLM call. `transient` says whether the same call may succeed later (rate limit,
    5xx, timeout, connection, garbled response); permanent failures (auth, bad request, unknown
    model, context window, content policy) fail the same way every time."""

    def __init__(
        self, message: str, *, transient: bool, status_code: int | None = None, kind: str = ""
    ):
        super().__init__(message)
        self.message = message
        self.transient = transient
        self.status_code = status_code
        self.kind = kind  # the exception class it came from, for logs and the step's record

    def __str__(self) -> str:
        status = f" (HTTP {self.status_code})" if self.status_code else ""
        return f"{'transient' if self.transient else 'permanent'} LLM error{status}: {self.message}"


def complete(
    model: str,
    messages: list[dict],
    *,
    tools: list[dict] | None = None,
    temperature: float = 0.2,
    max_tokens: int | None = None,
    timeout: float = 120,
    api_base: str | None = None,
    api_key: str | None = None,
    response_format: dict | None = None,
    on_text: Callable[[str], None] | None = None,
) -> LLMResult:
    """Make one chat completion call. Raises LLMError.

    With `on_text`, the answer is streamed and `on_text(text_so_far)` is called on every text
    delta (the caller throttles what it publishes). Exceptions raised by `on_text` propagate
    unchanged, so a caller can abort a stream (e.g. on cancel).
    """
    _ensure_scripted_price(model)
    request: dict = {"messages": messages, "temperature": temperature, "timeout": timeout}
    if tools:
        request["tools"] = tools
    if max_tokens:
        request["max_tokens"] = max_tokens
    if response_format:
        request["response_format"] = response_format

    started = time.monotonic()
    if api_base and model.startswith("openai/"):
        # Self-hosted servers rarely check keys, but the OpenAI client refuses to start
        # without one.
        key = api_key or os.environ.get("OPENAI_API_KEY") or "sk-no-key"
        client = _openai_client(api_base, key, os.getpid())
        reply = _call_openai(client, {**request, "model": model.removeprefix("openai/")}, on_text)
    else:
        litellm_request = {
            **request,
            "model": model,
            "num_retries": 0,
            "max_retries": 0,
            # A parameter a model does not take (temperature on reasoning models) is dropped
            # instead of failing every call as a bad request.
            "drop_params": True,
        }
        if api_base:
            litellm_request["api_base"] = api_base
        if api_key:
            litellm_request["api_key"] = api_key
        reply = _call_litellm(litellm_request, on_text)
    text, tool_calls, finish_reason, usage, response_model = reply
    if model.startswith("scripted/"):
        response_model = model  # LiteLLM's stream wrapper reports the name without its prefix
    latency_ms = int((time.monotonic() - started) * 1000)

    prompt_tokens, completion_tokens, cached_tokens = _usage_numbers(usage)
    if not (prompt_tokens or completion_tokens):  # a server that reports no usage: count it
        prompt_tokens = estimate_tokens(messages, tools)
        completion_tokens = scripted.count_tokens(text) + sum(
            scripted.count_tokens(json.dumps(c["arguments"])) for c in tool_calls
        )
    return LLMResult(
        text=text,
        tool_calls=tool_calls,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cached_tokens=cached_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        cost=_cost(model, response_model, prompt_tokens, completion_tokens, cached_tokens),
        model=model,
        latency_ms=latency_ms,
        finish_reason=finish_reason or ("tool_calls" if tool_calls else "stop"),
        response_model=response_model,
    )


class _Reply(NamedTuple):
    text: str
    tool_calls: list[dict]
    finish_reason: str
    usage: object  # the provider's usage object, or None
    response_model: str


def _call_litellm(kwargs: dict, on_text: Callable[[str], None] | None) -> _Reply:
    if on_text is not None:
        kwargs = {**kwargs, "stream": True, "stream_options": {"include_usage": True}}
        try:
            chunks = iter(litellm.completion(**kwargs))
        except Exception as exc:
            raise _error_from(exc) from exc
        reply, received = _stream(chunks, on_text)
        if reply.usage is None and received:
            try:
                built = litellm.stream_chunk_builder(received, messages=kwargs["messages"])
                reply = reply._replace(usage=getattr(built, "usage", None))
            except Exception:
                pass
        return reply
    return _answer(lambda: _completion_without_litellm_logging(kwargs))


def _call_openai(
    client: openai.OpenAI, request: dict, on_text: Callable[[str], None] | None
) -> _Reply:
    """The same request as through LiteLLM, sent with the OpenAI SDK's own client."""
    if on_text is not None:
        try:
            stream = client.chat.completions.create(
                **request, stream=True, stream_options={"include_usage": True}
            )
        except Exception as exc:
            raise _error_from(exc) from exc
        with stream:  # gives the connection back even when on_text stops the stream
            reply, _ = _stream(iter(stream), on_text)
        return reply
    # Posted as it is and read back as plain JSON: `create()` walks the whole request through
    # the SDK's type transforms and builds its response models, about 4 ms of CPU per call,
    # twice the HTTP exchange. Errors are the SDK's own either way (status, timeout, connection).
    body = {key: value for key, value in request.items() if key != "timeout"}
    return _answer(
        lambda: client.post(
            "/chat/completions", body=body, cast_to=object, options={"timeout": request["timeout"]}
        )
    )


def _answer(create: Callable[[], object]) -> _Reply:
    """A non-streamed call through either client: its answer parsed, any failure an LLMError."""
    try:
        response = create()
        text, tool_calls, finish_reason = _parse_message(response)
    except LLMError:
        raise
    except Exception as exc:
        raise _error_from(exc) from exc
    model = _field(response, "model")
    return _Reply(
        text,
        tool_calls,
        finish_reason,
        _field(response, "usage"),
        model if isinstance(model, str) else "",
    )


def _field(value, name: str):
    """A member of an answer: an attribute of LiteLLM's or the SDK's objects, a key of plain
    JSON. None when it is missing."""
    if isinstance(value, dict):
        return value.get(name)
    return getattr(value, name, None)


@functools.lru_cache(maxsize=64)
def _openai_client(api_base: str, api_key: str, pid: int) -> openai.OpenAI:
    """One client, and so one connection pool, per server and key. The SDK's client is safe to
    share between threads; `pid` keeps a forked process from using its parent's connections.
    Its retries are off: the engine retries, records every attempt and falls back."""
    return openai.OpenAI(base_url=api_base, api_key=api_key, max_retries=0)


def _completion_without_litellm_logging(kwargs: dict):
    """Baton records every call itself (runs/context.py). After each call LiteLLM builds a
    logging payload in a background thread that nothing here reads, about 1 ms of CPU a call;
    it skips that for calls marked internal (LiteLLM's own nested calls), so ours are marked."""
    token = is_internal_call.set(True)
    try:
        return litellm.completion(**kwargs)
    finally:
        is_internal_call.reset(token)


def estimate_tokens(messages: list[dict], tools: list[dict] | None = None) -> int:
    """A cheap upper-ish estimate of a request's prompt tokens (4 characters per token plus a
    per-message overhead), for budget checks before a call."""
    chars = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        chars += len(content or "")
        if message.get("tool_calls"):
            chars += len(json.dumps(message["tool_calls"], default=str))
    if tools:
        chars += len(json.dumps(tools, default=str))
    return chars // 4 + 4 * len(messages) + 3


def litellm_prices(model: str) -> dict[str, Decimal] | None:
    """Per-1M-token prices from LiteLLM's bundled map: {"input", "output", "cached"}, or None
    when the map does not know the model. Cached input costs the input price when the map
    names no cache discount."""
    _ensure_scripted_price(model)
    try:
        info = litellm.get_model_info(model)
    except Exception:
        return None
    if info.get("input_cost_per_token") is None and info.get("output_cost_per_token") is None:
        return None
    input_cost = info.get("input_cost_per_token") or 0
    cached_cost = info.get("cache_read_input_token_cost")
    return {
        "input": _per_million(input_cost),
        "output": _per_million(info.get("output_cost_per_token") or 0),
        "cached": _per_million(input_cost if cached_cost is None else cached_cost),
    }


def is_self_hosted(model: str, api_base: str | None = None) -> bool:
    """Models served on our own hardware: Ollama and friends, or any server on loopback."""
    if model.split("/", 1)[0] in ("ollama", "ollama_chat", "hosted_vllm", "llamafile", "lm_studio"):
        return True
    if api_base:
        host = re.sub(r"^[a-z]+://", "", api_base.lower()).split("/", 1)[0]
        host = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
        return host in _LOOPBACK_HOSTS
    return False


# --- streaming ------------------------------------------------------------------------------


def _stream(chunks: Iterator, on_text: Callable[[str], None]) -> tuple[_Reply, list]:
    """Assemble a streamed answer from LiteLLM's or the OpenAI SDK's chunks (the same shape),
    calling on_text(text_so_far) on every text delta. Returns the reply and the chunks."""
    received = []
    text = ""
    calls: dict[int, dict] = {}
    finish_reason = ""
    usage = None
    response_model = ""
    while True:
        # Only the provider's part is wrapped: on_text's own exceptions must propagate as-is.
        try:
            chunk = next(chunks)
        except StopIteration:
            break
        except Exception as exc:
            raise _error_from(exc) from exc
        received.append(chunk)
        response_model = getattr(chunk, "model", None) or response_model
        if getattr(chunk, "usage", None):
            usage = chunk.usage
        if not getattr(chunk, "choices", None):
            continue
        choice = chunk.choices[0]
        delta = choice.delta
        if choice.finish_reason:
            finish_reason = choice.finish_reason
        for call in getattr(delta, "tool_calls", None) or []:
            index = getattr(call, "index", None)
            index = len(calls) if index is None else index
            slot = calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
            slot["id"] = slot["id"] or (call.id or "")
            function = call.function
            if function is not None:
                slot["name"] = slot["name"] or (function.name or "")
                slot["arguments"] += function.arguments or ""
        if delta.content:
            text += delta.content
            on_text(text)
    tool_calls = [
        {
            "id": slot["id"] or f"call_{index}",
            "name": slot["name"],
            "arguments": _parse_arguments(slot["name"], slot["arguments"]),
        }
        for index, slot in sorted(calls.items())
    ]
    return _Reply(text, tool_calls, finish_reason, usage, response_model), received


# --- parsing, usage and cost ----------------------------------------------------------------


def _parse_message(response) -> tuple[str, list[dict], str]:
    choices = _field(response, "choices")
    if not choices or not isinstance(choices, list):
        raise LLMError("the provider returned no choices", transient=True, kind="EmptyResponse")
    choice = choices[0]
    message = _field(choice, "message") or {}
    tool_calls = []
    for index, call in enumerate(_field(message, "tool_calls") or []):
        function = _field(call, "function") or {}
        name = _field(function, "name") or ""
        tool_calls.append(
            {
                "id": _field(call, "id") or f"call_{index}",
                "name": name,
                "arguments": _parse_arguments(name, _field(function, "arguments")),
            }
        )
    content = _field(message, "content")
    return (
        content if isinstance(content, str) else "",
        tool_calls,
        _field(choice, "finish_reason") or "",
    )


def _not_json(text: str):
    raise ValueError(f"{text} is not JSON")


def loads_model_json(text: str):
    """json.loads for what a model wrote: NaN, Infinity and numbers too large for a float are
    refused (Python reads them, no database's JSON column stores them), and so is nesting past
    the recursion limit. Every refusal is a ValueError, like any other bad JSON."""

    def finite(number: str) -> float:
        value = float(number)
        if value in (float("inf"), float("-inf")):
            _not_json(number)
        return value

    try:
        return json.loads(text, parse_constant=_not_json, parse_float=finite)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _parse_arguments(name: str, raw) -> dict:
    if isinstance(raw, dict):
        return raw
    if raw is None or str(raw).strip() == "":
        return {}
    try:
        value = loads_model_json(raw)
    except ValueError:
        # Garbled output; the same request usually comes back well-formed.
        raise LLMError(
            f"tool call {name!r} has arguments that are not JSON: {str(raw)[:200]}",
            transient=True,
            kind="MalformedToolArguments",
        ) from None
    if not isinstance(value, dict):
        raise LLMError(
            f"tool call {name!r} has arguments that are not a JSON object",
            transient=True,
            kind="MalformedToolArguments",
        )
    return value


def _usage_numbers(usage) -> tuple[int, int, int]:
    if usage is None:
        return 0, 0, 0
    prompt = int(_field(usage, "prompt_tokens") or 0)
    completion = int(_field(usage, "completion_tokens") or 0)
    cached = _field(_field(usage, "prompt_tokens_details"), "cached_tokens")
    return prompt, completion, min(int(cached or 0), prompt)


def _cost(
    model: str, response_model: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int
) -> Decimal:
    usage = Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details={"cached_tokens": cached_tokens} if cached_tokens else None,
    )
    for candidate in (model, response_model):
        if not candidate:
            continue
        try:
            prompt_cost, completion_cost = litellm.cost_per_token(
                model=candidate, usage_object=usage
            )
        except Exception:
            continue
        return Decimal(str(prompt_cost + completion_cost)).quantize(_COST_PLACES)
    return Decimal(0)


def _per_million(cost_per_token: float) -> Decimal:
    return (Decimal(str(cost_per_token)) * _PER_MILLION).quantize(Decimal("0.000001"))


# --- errors ---------------------------------------------------------------------------------

_TRANSIENT_STATUSES = {408, 409, 425, 429}
_PREFIXES = [
    re.compile(r"^litellm\.\w+:\s*"),
    re.compile(r"^\w+(?:Error|Exception):\s*"),
    re.compile(r"^\w+(?:Error|Exception)\s*-\s*"),
]


def _error_from(exc: Exception) -> LLMError:
    """Classify any failure of a LiteLLM or OpenAI SDK call. LiteLLM's exception classes derive
    from the SDK's, so they are looked at first."""
    if isinstance(exc, LLMError):
        return exc
    status = getattr(exc, "status_code", None)
    status = status if isinstance(status, int) else None
    message = _provider_message(exc)
    kind = type(exc).__name__
    if isinstance(exc, litellm.Timeout | openai.APITimeoutError):
        return LLMError(message or "timed out", transient=True, status_code=status, kind=kind)
    if isinstance(exc, litellm.ContextWindowExceededError | litellm.ContentPolicyViolationError):
        return LLMError(message, transient=False, status_code=status, kind=kind)
    if isinstance(
        exc,
        litellm.RateLimitError
        | litellm.APIConnectionError
        | litellm.InternalServerError
        | litellm.ServiceUnavailableError
        | litellm.BadGatewayError
        | litellm.APIResponseValidationError
        # The SDK's: no answer (or none in time, above), or an answer it could not read.
        | openai.APIConnectionError
        | openai.APIResponseValidationError,
    ):
        return LLMError(message, transient=True, status_code=status, kind=kind)
    if isinstance(
        exc,
        litellm.AuthenticationError
        | litellm.PermissionDeniedError
        | litellm.NotFoundError
        | litellm.BadRequestError
        | litellm.UnprocessableEntityError,
    ):
        return LLMError(message, transient=False, status_code=status, kind=kind)
    if status is not None:  # the SDK's APIStatusError and its subclasses among others
        transient = status in _TRANSIENT_STATUSES or status >= 500
        return LLMError(message, transient=transient, status_code=status, kind=kind)
    # No status and no known class: an unparseable or cut-off response, an error event in a
    # stream. Worth another try.
    return LLMError(message or kind, transient=True, status_code=None, kind=kind)


# Providers sometimes quote the key they refused, or the URL (with its credentials) they could
# not reach; the message becomes the step's error, shown on the run page and in its events.
_KEY_LIKE = re.compile(r"(?<![A-Za-z0-9])(?:sk|rk|pk)-[A-Za-z0-9_\-]{8,}")
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


def redact(text: str) -> str:
    """`text` without the secrets of this process's environment, key-like tokens or the
    credentials of URLs."""
    for name, value in os.environ.items():
        if len(value) >= 8 and name.endswith(("_KEY", "_TOKEN", "_SECRET", "_PASSWORD")):
            text = text.replace(value, "[redacted]")
    text = _URL_CREDENTIALS.sub("[redacted]@", text)
    return _KEY_LIKE.sub("[redacted]", text)


def _provider_message(exc: Exception) -> str:
    """The provider's own words, without LiteLLM's class-name prefixes or secrets."""
    # The OpenAI SDK keeps the server's error object as `body` (the "error" member of the JSON,
    # or the text of a non-JSON answer); its message is "Error code: 429 - {Python repr}".
    sent = getattr(exc, "body", None)
    if isinstance(sent, dict) and isinstance(sent.get("message"), str) and sent["message"]:
        message = sent["message"].strip()
    elif isinstance(sent, str) and sent.strip():
        message = sent.strip()
    else:
        message = str(getattr(exc, "message", "") or exc).strip()
    for _ in range(3):
        for prefix in _PREFIXES:
            message = prefix.sub("", message, count=1)
    body = message.strip()
    # OpenAI-compatible servers send {"error": {"message": ...}}; keep the message only.
    if body.startswith("{"):
        try:
            data = json.loads(body)
            inner = data.get("error", data)
            body = inner.get("message", body) if isinstance(inner, dict) else str(inner)
        except ValueError:
            pass
    return redact(body)[:1000]


# --- the scripted provider ------------------------------------------------------------------


class ScriptedLLM(CustomLLM):
    """LiteLLM provider `scripted/`: answers from runs.scripted, offline and deterministic."""

    def completion(self, *args, **kwargs) -> ModelResponse:
        model, messages, optional_params = _scripted_request(args, kwargs)
        text, tool_calls, usage = _scripted_answer(messages, optional_params)
        response: ModelResponse = kwargs.get("model_response") or ModelResponse()
        response.choices[0].message = Message(
            content=(text or None) if tool_calls else text,
            tool_calls=[
                ChatCompletionMessageToolCall(
                    id=call["id"],
                    type="function",
                    function=Function(name=call["name"], arguments=json.dumps(call["arguments"])),
                )
                for call in tool_calls
            ]
            or None,
        )
        response.choices[0].finish_reason = "tool_calls" if tool_calls else "stop"
        response.model = f"scripted/{model}"
        response.usage = Usage(
            prompt_tokens=usage["prompt_tokens"],
            completion_tokens=usage["completion_tokens"],
            total_tokens=usage["total_tokens"],
            prompt_tokens_details={"cached_tokens": 0},
        )
        return response

    def streaming(self, *args, **kwargs) -> Iterator[dict]:
        _, messages, optional_params = _scripted_request(args, kwargs)
        text, tool_calls, usage = _scripted_answer(messages, optional_params)
        for piece in scripted.chunks(text):
            yield {
                "text": piece,
                "tool_use": None,
                "is_finished": False,
                "finish_reason": "",
                "usage": None,
                "index": 0,
            }
        for index, call in enumerate(tool_calls):
            yield {
                "text": "",
                "tool_use": {
                    "id": call["id"],
                    "type": "function",
                    "index": index,
                    "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])},
                },
                "is_finished": False,
                "finish_reason": "",
                "usage": None,
                "index": 0,
            }
        yield {
            "text": "",
            "tool_use": None,
            "is_finished": True,
            "finish_reason": "tool_calls" if tool_calls else "stop",
            "index": 0,
            "usage": {
                "prompt_tokens": usage["prompt_tokens"],
                "completion_tokens": usage["completion_tokens"],
                "total_tokens": usage["total_tokens"],
            },
        }

    async def acompletion(self, *args, **kwargs) -> ModelResponse:
        return self.completion(*args, **kwargs)

    async def astreaming(self, *args, **kwargs):
        for chunk in self.streaming(*args, **kwargs):
            yield chunk


def _scripted_request(args: tuple, kwargs: dict) -> tuple[str, list[dict], dict]:
    model = kwargs.get("model", args[0] if args else "baton")
    messages = kwargs.get("messages", args[1] if len(args) > 1 else [])
    return model, messages, kwargs.get("optional_params") or {}


def _scripted_answer(messages: list[dict], optional_params: dict) -> tuple[str, list, dict]:
    tools = optional_params.get("tools")
    try:
        text, tool_calls = scripted.answer(messages, tools, optional_params.get("response_format"))
    except scripted.ScriptedFailure as failure:
        if failure.transient:
            raise litellm.ServiceUnavailableError(
                message=failure.message, llm_provider="scripted", model="scripted"
            ) from None
        raise litellm.BadRequestError(
            message=failure.message, llm_provider="scripted", model="scripted"
        ) from None
    return text, tool_calls, scripted.usage_for(messages, tools, text, tool_calls)


def _register_price(model: str) -> None:
    prices = scripted.PRICE_PER_1M
    litellm.register_model(
        {
            model: {
                "input_cost_per_token": float(prices["input"] / _PER_MILLION),
                "output_cost_per_token": float(prices["output"] / _PER_MILLION),
                "cache_read_input_token_cost": float(prices["cached"] / _PER_MILLION),
                "litellm_provider": "scripted",
                "mode": "chat",
            }
        }
    )


def _ensure_scripted_price(model: str) -> None:
    """Any scripted/ model name is priced like scripted/baton."""
    if model.startswith("scripted/") and model not in litellm.model_cost:
        _register_price(model)


def _register_scripted_provider() -> None:
    others = [entry for entry in litellm.custom_provider_map if entry.get("provider") != "scripted"]
    scripted_entry = {"provider": "scripted", "custom_handler": ScriptedLLM()}
    litellm.custom_provider_map = [*others, scripted_entry]
    _register_price("scripted/baton")


_register_scripted_provider()
