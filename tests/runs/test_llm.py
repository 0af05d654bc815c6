"""The LLM seam against a real HTTP server: the fake OpenAI-compatible one on loopback."""

import json
import subprocess
import sys
import time
import urllib.request
from decimal import Decimal
from pathlib import Path

import pytest

from runs import llm

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = [
    {"role": "system", "content": "You are Researcher. Your goal: find facts."},
    {"role": "user", "content": "Research durable execution"},
]
SEARCH = {
    "type": "function",
    "function": {
        "name": "search_notes",
        "description": "Search the notes",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}},
            "required": ["query"],
        },
    },
}
# gpt-4o-mini in LiteLLM's bundled map, per token.
INPUT, OUTPUT, CACHED = Decimal("0.15e-6"), Decimal("0.6e-6"), Decimal("0.075e-6")


def call(fake, **kwargs) -> llm.LLMResult:
    kwargs.setdefault("api_key", "sk-fake")
    return llm.complete(
        fake.model(), kwargs.pop("messages", MESSAGES), api_base=fake.base_url, **kwargs
    )


def failure(fake, behaviour: dict, **kwargs) -> llm.LLMError:
    fake.fail_next(behaviour)
    with pytest.raises(llm.LLMError) as error:
        call(fake, **kwargs)
    return error.value


def test_complete_returns_text_usage_cost_and_latency(fake_llm):
    fake_llm.latency_ms = 120

    result = call(fake_llm)

    assert result.text.startswith("## Findings on durable execution")
    assert result.tool_calls == []
    assert result.finish_reason == "stop"
    assert result.model == "openai/gpt-4o-mini"
    assert result.prompt_tokens > 0 and result.completion_tokens > 0
    assert result.total_tokens == result.prompt_tokens + result.completion_tokens
    assert result.cost == result.prompt_tokens * INPUT + result.completion_tokens * OUTPUT
    assert result.latency_ms >= 120


def test_request_carries_model_options_tools_and_key(fake_llm):
    call(fake_llm, tools=[SEARCH], temperature=0.7, max_tokens=300)

    [body] = fake_llm.requests
    assert body["model"] == "gpt-4o-mini"
    assert body["messages"] == MESSAGES
    assert body["temperature"] == 0.7
    assert body["max_tokens"] == 300
    assert body["tools"][0]["function"]["name"] == "search_notes"
    assert not body.get("stream")
    assert fake_llm.request_log[0]["authorization"] == "Bearer sk-fake"


def test_an_openai_compatible_server_is_called_with_the_openai_sdk_not_through_litellm(fake_llm):
    """LiteLLM costs more CPU per call than the rest of a durable step. It wraps the same SDK
    and reads every answer through the SDK's raw-response API, which says so in a header."""
    call(fake_llm, tools=[SEARCH])
    call(fake_llm, on_text=lambda text: None)

    for request in fake_llm.request_log:
        assert request["headers"]["user-agent"].startswith("OpenAI/Python")
        assert "x-stainless-raw-response" not in request["headers"]
    assert fake_llm.request_count == 2


def test_an_openai_model_without_an_api_base_still_goes_through_litellm(fake_llm, monkeypatch):
    # Where LiteLLM (and the OpenAI SDK) send openai/ models when no api_base is given.
    monkeypatch.setenv("OPENAI_BASE_URL", fake_llm.base_url)

    seen: list[str] = []
    result = llm.complete(fake_llm.model(), MESSAGES, api_key="sk-fake")
    streamed = llm.complete(fake_llm.model(), MESSAGES, api_key="sk-fake", on_text=seen.append)

    assert result.text == streamed.text == seen[-1]
    assert result.text.startswith("## Findings on durable execution")
    assert result.cost > 0 and streamed.cost == result.cost
    assert [r["headers"].get("x-stainless-raw-response") for r in fake_llm.request_log] == [
        "true",
        "true",
    ]


def test_tool_calls_are_parsed_into_names_and_argument_dicts(fake_llm):
    result = call(fake_llm, tools=[SEARCH])

    assert result.finish_reason == "tool_calls"
    assert result.text == ""
    [tool_call] = result.tool_calls
    assert tool_call["name"] == "search_notes"
    assert tool_call["arguments"] == {"query": "durable execution"}
    assert tool_call["id"].startswith("call_")


def test_canned_reply_with_several_tool_calls_is_parsed(fake_llm):
    fake_llm.reply_next(
        {
            "content": "Checking both.",
            "tool_calls": [
                {"id": "a1", "name": "calculator", "arguments": {"expression": "2+2"}},
                {"id": "a2", "name": "word_count", "arguments": {"text": "two words"}},
            ],
        }
    )

    result = call(fake_llm, tools=[SEARCH])

    assert result.text == "Checking both."
    assert [(c["id"], c["name"], c["arguments"]) for c in result.tool_calls] == [
        ("a1", "calculator", {"expression": "2+2"}),
        ("a2", "word_count", {"text": "two words"}),
    ]


def test_streaming_reports_growing_text_and_still_gets_usage(fake_llm):
    seen: list[str] = []

    result = call(fake_llm, on_text=seen.append)

    assert len(seen) > 10
    assert all(
        later.startswith(earlier) and later != earlier
        for earlier, later in zip(seen, seen[1:], strict=False)
    )
    assert seen[-1] == result.text
    assert fake_llm.requests[0]["stream"] is True
    assert fake_llm.requests[0]["stream_options"] == {"include_usage": True}
    assert result.text == call(fake_llm).text  # same answer as without streaming
    assert result.prompt_tokens > 0 and result.completion_tokens > 0
    assert result.cost > 0


def test_streaming_assembles_tool_call_deltas(fake_llm):
    seen: list[str] = []

    result = call(fake_llm, tools=[SEARCH], on_text=seen.append)

    assert result.tool_calls == [
        {
            "id": result.tool_calls[0]["id"],
            "name": "search_notes",
            "arguments": {"query": "durable execution"},
        }
    ]
    assert result.finish_reason == "tool_calls"
    assert seen == []


def test_cached_prompt_tokens_are_reported_and_priced_at_the_cached_rate(fake_llm):
    fake_llm.set_usage(prompt_tokens=1000, completion_tokens=100, cached_tokens=400)

    result = call(fake_llm)

    assert result.prompt_tokens == 1000
    assert result.completion_tokens == 100
    assert result.cached_tokens == 400
    assert result.cost == 600 * INPUT + 400 * CACHED + 100 * OUTPUT


def test_on_text_exceptions_reach_the_caller_unchanged(fake_llm):
    class Stop(Exception):
        pass

    def on_text(text: str) -> None:
        raise Stop

    with pytest.raises(Stop):
        call(fake_llm, on_text=on_text)


@pytest.mark.parametrize("status", [429, 500, 502, 503])
def test_rate_limits_and_server_errors_are_transient_and_not_retried_by_litellm(fake_llm, status):
    error = failure(fake_llm, {"status": status, "message": "try again later please"})

    assert error.transient is True
    assert error.status_code == status
    assert "try again later please" in error.message
    assert fake_llm.request_count == 1  # Baton retries, not LiteLLM


def test_a_hang_past_the_timeout_is_transient(fake_llm):
    started = time.monotonic()
    error = failure(fake_llm, {"hang": 10}, timeout=0.5)

    assert error.transient is True
    assert time.monotonic() - started < 5


def test_a_malformed_body_is_transient(fake_llm):
    assert failure(fake_llm, {"malformed": True}).transient is True


def test_a_dropped_connection_is_transient(fake_llm):
    assert failure(fake_llm, {"drop": True}).transient is True
    assert fake_llm.request_count == 1


@pytest.mark.parametrize(
    "behaviour",
    [
        {"status": 429, "message": "slow down"},
        {"hang": 10},
        {"malformed": True},
        {"drop": True, "after_chunks": 3},
    ],
)
def test_streaming_failures_are_transient(fake_llm, behaviour):
    error = failure(fake_llm, behaviour, timeout=0.5, on_text=lambda text: None)

    assert error.transient is True


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (401, "Incorrect API key provided: sk-fake."),
        (403, "Your organisation may not use this model."),
        (400, "'messages' must contain at least one message."),
        (404, "The model `gpt-9` does not exist or you do not have access to it."),
    ],
)
def test_auth_bad_request_and_unknown_model_are_permanent_with_the_providers_message(
    fake_llm, status, message
):
    error = failure(fake_llm, {"status": status, "message": message})

    assert error.transient is False
    assert error.status_code == status
    assert error.message == message


def test_an_unknown_provider_is_permanent():
    with pytest.raises(llm.LLMError) as error:
        llm.complete("no-such-provider/model", MESSAGES)

    assert error.value.transient is False


def test_a_self_hosted_server_needs_no_api_key(fake_llm, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)

    result = llm.complete(fake_llm.model("llama-3-8b"), MESSAGES, api_base=fake_llm.base_url)

    assert result.text
    assert result.cost == 0  # not in LiteLLM's price map
    assert fake_llm.requests[0]["model"] == "llama-3-8b"


def test_result_round_trips_through_json_for_replay(fake_llm):
    result = call(fake_llm, tools=[SEARCH])

    assert llm.LLMResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_estimate_tokens_grows_with_the_prompt_and_the_tools():
    short = llm.estimate_tokens([{"role": "user", "content": "hi"}])
    longer = llm.estimate_tokens([{"role": "user", "content": "hi " * 400}])
    with_tools = llm.estimate_tokens([{"role": "user", "content": "hi " * 400}], tools=[SEARCH])

    assert 0 < short < longer < with_tools
    assert 250 <= longer <= 350  # about 4 characters per token


def test_litellm_prices_come_from_the_bundled_map():
    assert llm.litellm_prices("openai/gpt-4o-mini") == {
        "input": Decimal("0.15"),
        "output": Decimal("0.6"),
        "cached": Decimal("0.075"),
    }
    assert llm.litellm_prices("scripted/baton") == {
        "input": Decimal("0.5"),
        "output": Decimal("1.5"),
        "cached": Decimal("0.25"),
    }
    assert llm.litellm_prices("nobody/knows-this-model") is None


# --- the fake server's own controls --------------------------------------------------------


def _post(url: str, data: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def test_control_endpoint_queues_faults_and_reports_requests(fake_llm):
    state = _post(
        fake_llm.control_url,
        {"faults": [{"status": 503, "message": "overloaded"}], "latency_ms": 50},
    )
    assert state["pending"] == [{"status": 503, "message": "overloaded"}]

    with pytest.raises(llm.LLMError) as error:
        call(fake_llm)
    assert (error.value.status_code, error.value.message) == (503, "overloaded")
    assert call(fake_llm).latency_ms >= 50

    state = _post(fake_llm.control_url, {"include_requests": True})
    assert state["request_count"] == 2
    assert state["requests"][0]["model"] == "gpt-4o-mini"
    assert state["pending"] == []
    assert _post(fake_llm.control_url, {"reset": True})["request_count"] == 0


def test_fault_rate_with_a_seed_repeats_the_same_faults(fake_llm):
    def outcomes() -> list[str]:
        fake_llm.reset()
        fake_llm.set_fault_rate(0.5, seed=7)
        results = []
        for _ in range(12):
            try:
                call(fake_llm)
                results.append("ok")
            except llm.LLMError as error:
                results.append(str(error.status_code))
        return results

    first = outcomes()
    assert first == outcomes()
    assert "ok" in first and {"429", "500"} & set(first)


def test_fake_server_answers_another_process(fake_llm):
    """Engine workers are separate processes: the URL must work from them."""
    script = (
        "import json, sys, urllib.request\n"
        "message = {'role': 'user', 'content': 'Research tides'}\n"
        "body = json.dumps({'model': 'm', 'messages': [message]})\n"
        "request = urllib.request.Request(sys.argv[1] + '/chat/completions', data=body.encode(),"
        " headers={'Content-Type': 'application/json'})\n"
        "print(json.load(urllib.request.urlopen(request))['choices'][0]['message']['content'])\n"
    )
    output = subprocess.run(
        [sys.executable, "-c", script, fake_llm.base_url],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout

    assert "tides" in output
    assert fake_llm.request_count == 1


def test_fake_server_runs_standalone():
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_llm", "--port", "0", "--latency-ms", "10"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        base_url = process.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
        result = llm.complete("openai/gpt-4o-mini", MESSAGES, api_base=base_url, api_key="k")
        assert "durable execution" in result.text
    finally:
        process.terminate()
        process.wait(10)
