"""The scripted provider: deterministic, plausible answers that follow the engine's markers."""

import json

import jsonschema
import pytest

from runs import scripted

RESEARCHER = {"role": "system", "content": "You are Researcher. Your goal: find facts."}
ANALYST = {"role": "system", "content": "You are Analyst. Your goal: analyse what research found."}
WRITER = {"role": "system", "content": "You are Writer. Your goal: write a short report."}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def tool_function(name: str, properties: dict, required: list[str]) -> dict:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": f"The {name} tool",
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


SEARCH = tool_function("search_notes", {"query": {"type": "string"}}, ["query"])
EMAIL = tool_function(
    "send_email",
    {"to": {"type": "string"}, "subject": {"type": "string"}, "body": {"type": "string"}},
    ["to"],
)


def test_offered_tools_get_one_call_of_the_first_tool_about_the_topic():
    text, calls = scripted.answer(
        [RESEARCHER, user("Research durable execution")], tools=[SEARCH, EMAIL]
    )

    assert text == ""
    assert len(calls) == 1
    assert calls[0]["name"] == "search_notes"
    assert calls[0]["arguments"] == {"query": "durable execution"}
    assert calls[0]["id"].startswith("call_")


def test_tool_arguments_follow_the_schema():
    odd = tool_function(
        "odd",
        {
            "to": {"type": "string"},
            "expression": {"type": "string"},
            "count": {"type": "integer", "minimum": 3},
            "ratio": {"type": "number"},
            "fail": {"type": "boolean"},
            "mode": {"type": "string", "enum": ["fast", "slow"]},
            "optional_flag": {"type": "boolean"},
        },
        ["to", "expression", "count", "ratio", "fail", "mode"],
    )

    _, calls = scripted.answer([user("Email the cost figures")], tools=[odd])

    assert calls[0]["arguments"] == {
        "to": "team@example.com",
        "expression": "6*7",
        "count": 3,
        "ratio": 1,
        "fail": False,
        "mode": "fast",
    }


def test_email_tool_call_reads_like_an_email():
    _, calls = scripted.answer([user("Topic: quarterly cloud costs")], tools=[EMAIL])

    arguments = calls[0]["arguments"]
    assert arguments["to"] == "team@example.com"
    assert arguments["subject"] == "Quarterly Cloud Costs"
    assert "quarterly cloud costs" in arguments["body"]


def test_after_a_tool_result_the_answer_is_text_that_uses_it():
    messages = [
        RESEARCHER,
        user("Research durable execution"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "search_notes", "arguments": '{"query": "durable"}'},
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": "call_1",
            "content": '{"results": [{"title": "durability", "snippet": "persists every step"}]}',
        },
    ]

    text, calls = scripted.answer(messages, tools=[SEARCH])

    assert calls == []
    assert "From `search_notes`" in text
    assert "persists every step" in text
    assert "durable execution" in text


def test_json_schema_response_format_gets_valid_json():
    schema = {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 40},
            "findings": {"type": "array", "items": {"type": "string"}, "minItems": 2},
            "confidence": {"type": "number", "minimum": 0, "maximum": 0.9},
            "label": {"type": "string", "enum": ["keep", "drop"]},
            "sources": {"type": "array", "maxItems": 1, "items": {"$ref": "#/$defs/source"}},
            "meta": {
                "type": "object",
                "properties": {"reviewed": {"type": "boolean"}, "score": {"type": "integer"}},
                "required": ["reviewed", "score"],
            },
            "note": {"anyOf": [{"type": "null"}, {"type": "string", "minLength": 5}]},
        },
        "required": ["title", "findings", "confidence", "label", "sources", "meta", "note"],
        "additionalProperties": False,
        "$defs": {
            "source": {
                "type": "object",
                "properties": {"url": {"type": "string", "format": "uri"}},
                "required": ["url"],
            }
        },
    }
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "report", "schema": schema, "strict": True},
    }

    text, calls = scripted.answer(
        [ANALYST, user("Analyse agent frameworks")], response_format=response_format
    )

    value = json.loads(text)
    jsonschema.validate(value, schema)
    assert calls == []
    assert value["label"] == "keep"
    assert len(value["findings"]) == 2
    assert "agent frameworks" in value["findings"][0].lower()


def test_schema_in_the_prompt_is_answered_with_matching_json():
    schema = {
        "type": "object",
        "properties": {"verdict": {"type": "string"}, "winner": {"type": "integer", "minimum": 1}},
        "required": ["verdict", "winner"],
    }
    prompt = (
        "Judge the answers about solar power.\n\n"
        f"Respond with JSON matching this schema:\n{json.dumps(schema, indent=2)}\n"
    )

    text, _ = scripted.answer([user(prompt)])

    jsonschema.validate(json.loads(text), schema)


def test_json_object_format_without_schema_gets_a_json_object():
    text, _ = scripted.answer(
        [user("Summarise the meeting")], response_format={"type": "json_object"}
    )

    assert isinstance(json.loads(text), dict)


def test_choose_one_of_picks_the_first_option_not_already_chosen():
    prompt = "Pick who works next.\nCHOOSE ONE OF: researcher | writer | FINISH\n"
    first, _ = scripted.answer([user(prompt)])
    second, _ = scripted.answer([user(prompt + "ALREADY CHOSEN: researcher\n")])
    done, _ = scripted.answer([user(prompt + "ALREADY CHOSEN: researcher | writer | FINISH\n")])

    assert (first, second, done) == ("researcher", "writer", "FINISH")


def test_debate_agrees_from_round_two_when_asked():
    ask = "If you now agree with the others, start your reply with AGREE.\n"
    round_one, _ = scripted.answer([user(f"Debate remote work\nROUND 1\n{ask}")])
    round_two, _ = scripted.answer([user(f"Debate remote work\nROUND 2\n{ask}")])

    assert not round_one.startswith("AGREE")
    assert round_two.startswith("AGREE")
    assert "remote work" in round_two


@pytest.mark.parametrize(
    ("system", "marker"),
    [
        (RESEARCHER, "## Findings on carbon pricing\n\n- "),
        (ANALYST, "## Analysis of carbon pricing"),
        (WRITER, "# Carbon Pricing\n"),
    ],
)
def test_prose_follows_the_role_and_mentions_the_topic(system, marker):
    text, _ = scripted.answer([system, user("Research carbon pricing")])

    assert text.startswith(marker)
    assert text.count("carbon pricing") >= 2
    assert len(text.split("\n\n")) >= 3  # a few paragraphs, not one line


def test_same_request_gets_the_same_answer_and_other_topics_differ():
    messages = [RESEARCHER, user("Research battery recycling")]

    assert scripted.answer(messages) == scripted.answer(list(messages))
    assert scripted.answer(messages)[0] != scripted.answer([RESEARCHER, user("Research tides")])[0]


def test_fail_marker_raises_a_permanent_failure():
    with pytest.raises(scripted.ScriptedFailure) as failure:
        scripted.answer([user("Research x SCRIPTED_FAIL: permanent")])

    assert failure.value.transient is False
    assert failure.value.status_code == 400


def test_usage_is_counted_from_words_and_chunks_rebuild_the_text():
    text, calls = scripted.answer([RESEARCHER, user("Research tides")])
    usage = scripted.usage_for([RESEARCHER, user("Research tides")], None, text, calls)

    assert usage["completion_tokens"] == scripted.count_tokens(text)
    assert usage["completion_tokens"] == -(-len(text.split()) * 4 // 3)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    pieces = scripted.chunks(text)
    assert len(pieces) > 10
    assert "".join(pieces) == text


# --- through LiteLLM, as the engine calls it -----------------------------------------------


def test_scripted_model_calls_a_tool_then_answers_through_litellm():
    from runs import llm

    messages = [RESEARCHER, user("Research durable execution")]
    first = llm.complete("scripted/baton", messages, tools=[SEARCH])
    call = first.tool_calls[0]
    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call["id"], "content": '{"hits": 3}'},
    ]
    second = llm.complete("scripted/baton", messages, tools=[SEARCH])

    assert first.finish_reason == "tool_calls"
    assert call["name"] == "search_notes"
    assert call["arguments"] == {"query": "durable execution"}
    assert second.tool_calls == []
    assert second.finish_reason == "stop"
    assert "durable execution" in second.text
    assert '{"hits": 3}' in second.text


def test_scripted_model_costs_its_configured_price():
    from runs import llm

    result = llm.complete("scripted/baton", [WRITER, user("Write about tides")])

    expected = (
        result.prompt_tokens * scripted.PRICE_PER_1M["input"]
        + result.completion_tokens * scripted.PRICE_PER_1M["output"]
    ) / 1_000_000
    assert result.cost > 0
    assert result.cost == expected.quantize(result.cost)
    assert result.model == "scripted/baton"
    assert result.cached_tokens == 0


def test_other_scripted_model_names_are_priced_too():
    from runs import llm

    result = llm.complete("scripted/demo-writer", [WRITER, user("Write about tides")])

    assert result.cost > 0
    assert result.model == "scripted/demo-writer"


def test_scripted_model_streams_the_same_answer_in_small_pieces():
    from runs import llm

    messages = [ANALYST, user("Analyse heat pumps")]
    seen: list[str] = []
    streamed = llm.complete("scripted/baton", messages, on_text=seen.append)
    plain = llm.complete("scripted/baton", messages)

    assert streamed.text == plain.text
    assert len(seen) > 10
    assert all(later.startswith(earlier) for earlier, later in zip(seen, seen[1:], strict=False))
    assert seen[-1] == plain.text
    assert streamed.prompt_tokens == plain.prompt_tokens > 0
    assert streamed.cost == plain.cost > 0


def test_scripted_model_returns_schema_valid_json_through_litellm():
    from runs import llm

    schema = {
        "type": "object",
        "properties": {
            "summary": {"type": "string"},
            "risks": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["summary", "risks"],
    }
    result = llm.complete(
        "scripted/baton",
        [ANALYST, user("Analyse heat pumps")],
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )

    jsonschema.validate(json.loads(result.text), schema)


def test_scripted_fail_marker_is_a_permanent_llm_error():
    from runs import llm

    with pytest.raises(llm.LLMError) as error:
        llm.complete("scripted/baton", [user("Research x\nSCRIPTED_FAIL: permanent")])

    assert error.value.transient is False
    assert error.value.status_code == 400
    assert "SCRIPTED_FAIL: permanent" in error.value.message
