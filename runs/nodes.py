"""What each node kind does inside its step. A node function takes a StepContext and returns
the node's output (JSON-able); it raises a StepInterrupt to wait, fail or stop.

These functions hold no transactions across calls and keep no state of their own: everything
they need again after a crash is replayed from the context's records.
"""

from __future__ import annotations

import json
import re

import jsonschema

from runs import rows
from runs.context import (
    ApprovalRejected,
    StepContext,
    StepFailed,
    WaitingForHuman,
    lookup,
    render,
    render_value,
)
from runs.llm import loads_model_json
from runs.models import Run
from teams.models import Agent, Role, Tool, Workflow

CHOICE_LINE = "CHOOSE ONE OF: {options}"
CHOSEN_LINE = "ALREADY CHOSEN: {options}"
FINISH = "FINISH"


# An agent with its role, and its tools: read by every agent step, so written out once
# (runs/rows.py) instead of compiled by the ORM each time.
_AGENT = rows.Rows([(Agent, "a", ()), (Role, "r", ())])
_TOOL = rows.Rows([(Tool, "t", ())])


def get_agent(name: str, token: int | None = None) -> Agent:
    """The agent of this name with its role, kept while the lookup token is `token`."""
    return rows.kept(("agent", name), token, lambda: _read_agent(name))


def _read_agent(name: str) -> Agent:
    sql = (
        f"SELECT {_AGENT.columns()} FROM {rows.table(Agent)} a "
        f"INNER JOIN {rows.table(Role)} r ON r.id = a.role_id WHERE a.name = %s LIMIT 1"
    )
    found = _AGENT.first(sql, [name])
    if found is None:
        raise StepFailed("permanent", f"agent {name!r} does not exist")
    agent, role = found
    rows.set_cached(agent, "role", role)
    return agent


def tools_of(agent: Agent, token: int | None = None) -> list[Tool]:
    """The agent's tools by name, as `agent.tools.all()` gives them, kept while the lookup
    token is `token`."""
    return rows.kept(("tools", agent.pk), token, lambda: _read_tools(agent))


def _read_tools(agent: Agent) -> list[Tool]:
    through = Agent.tools.through
    sql = (
        f"SELECT {_TOOL.columns()} FROM {rows.table(Tool)} t "
        f"INNER JOIN {rows.table(through)} x ON x.{through.tool.field.column} = t.id "
        f"WHERE x.{through.agent.field.column} = %s ORDER BY t.name"
    )
    return [tool for (tool,) in _TOOL.all(sql, [agent.pk])]


def system_prompt(agent: Agent, output_schema: dict | None = None) -> str:
    parts = [f"You are {agent.role.name}.", f"Your goal: {agent.role.goal}"]
    if agent.role.backstory:
        parts.append(f"Backstory: {agent.role.backstory}")
    if agent.system_prompt:
        parts.append(agent.system_prompt)
    if output_schema:
        parts.append("Respond with JSON matching this schema:\n" + json.dumps(output_schema))
    return "\n\n".join(parts)


def task_prompt(ctx: StepContext, default: str = "{input}") -> str:
    template = (
        (ctx.run.overrides.get(ctx.node["id"]) or {}).get("prompt")
        or ctx.node.get("prompt")
        or default
    )
    state = {**ctx.state, "input": ctx.run.input}
    return render(template, state)


# --- agent ----------------------------------------------------------------------------------


def run_agent(
    ctx: StepContext,
    agent: Agent,
    prompt: str,
    output_schema: dict | None = None,
    history: list[dict] | None = None,
) -> tuple[str, object]:
    """The agent loop: ask, run the tool calls it makes, ask again, until it answers.

    Returns (text, parsed output). A reply that misses its schema (or is empty) gets one repair
    prompt; then a StepFailed("semantic").
    """
    tools = {t.name: t for t in tools_of(agent, ctx.lookup_token)}
    offered = [t.as_function() for t in tools.values()] or None
    messages = [
        {"role": "system", "content": system_prompt(agent, output_schema)},
        *(history or []),
        {"role": "user", "content": prompt},
    ]
    for _round in range(agent.max_tool_rounds + 1):
        reply = ctx.llm(agent, messages, tools=offered)
        if not reply.tool_calls:
            break
        messages.append(
            {
                "role": "assistant",
                "content": reply.text or None,
                "tool_calls": [
                    {
                        "id": c["id"],
                        "type": "function",
                        "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])},
                    }
                    for c in reply.tool_calls
                ],
            }
        )
        for call in reply.tool_calls:
            tool = tools.get(call["name"])
            if tool is None:
                outcome = {"error": f"unknown tool {call['name']!r}"}
            else:
                outcome = ctx.call_tool(tool, call.get("arguments") or {}, call.get("id", ""))
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": call["id"],
                    "content": json.dumps(outcome, default=str),
                }
            )
    else:
        raise StepFailed(
            "semantic", f"agent still calling tools after {agent.max_tool_rounds} rounds"
        )
    ctx.messages_log = messages + [{"role": "assistant", "content": reply.text}]

    problem = output_problem(reply.text, output_schema)
    if problem is None:
        return reply.text, parse_output(reply.text, output_schema)
    messages = messages + [
        {"role": "assistant", "content": reply.text},
        {
            "role": "user",
            "content": f"Your reply was not usable: {problem}. Reply again with "
            + ("only JSON matching the schema." if output_schema else "a complete answer."),
        },
    ]
    repaired = ctx.llm(agent, messages)
    ctx.messages_log = messages + [{"role": "assistant", "content": repaired.text}]
    problem = output_problem(repaired.text, output_schema)
    if problem is not None:
        raise StepFailed("semantic", f"output still invalid after one repair: {problem}")
    return repaired.text, parse_output(repaired.text, output_schema)


def extract_json(text: str):
    text = text.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return loads_model_json(text)
    except ValueError:
        start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
        if start < 0:
            raise
        return loads_model_json(text[start : text.rfind("}" if text[start] == "{" else "]") + 1])


def output_problem(text: str, schema: dict | None) -> str | None:
    if not text or not text.strip():
        return "the reply was empty"
    if not schema:
        return None
    try:
        value = extract_json(text)
    except ValueError:
        return "the reply is not JSON"
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        return f"the JSON does not match the schema: {exc.message}"
    return None


def parse_output(text: str, schema: dict | None):
    return extract_json(text) if schema else text


def agent_node(ctx: StepContext):
    agent = get_agent(ctx.node["agent"], ctx.lookup_token)
    ctx.step.agent = agent
    text, output = run_agent(ctx, agent, task_prompt(ctx), ctx.node.get("output_schema"))
    return text, output


# --- tool -----------------------------------------------------------------------------------


def tool_node(ctx: StepContext):
    tool = Tool.objects.filter(name=ctx.node["tool"]).first()
    if tool is None:
        raise StepFailed("permanent", f"tool {ctx.node['tool']!r} does not exist")
    arguments = render_value(ctx.node.get("args") or {}, {**ctx.state, "input": ctx.run.input})
    outcome = ctx.call_tool(tool, arguments)
    if "error" in outcome:
        raise StepFailed("permanent", f"tool {tool.name} failed: {outcome['error']}")
    return json.dumps(outcome["result"], default=str), outcome["result"]


# --- router ---------------------------------------------------------------------------------


def condition_holds(condition: dict | None, state: dict) -> bool:
    if not condition:
        return True
    op = condition.get("op", "eq")
    try:
        value = lookup(state, condition["path"])
    except KeyError:
        return op == "exists" and False
    expected = condition.get("value")
    try:
        return {
            "eq": lambda: value == expected,
            "ne": lambda: value != expected,
            "gt": lambda: value > expected,
            "gte": lambda: value >= expected,
            "lt": lambda: value < expected,
            "lte": lambda: value <= expected,
            "contains": lambda: expected in value,
            "in": lambda: value in expected,
            "exists": lambda: True,
            "truthy": lambda: bool(value),
        }[op]()
    except TypeError:
        return False


def router_node(ctx: StepContext):
    edges = [
        e
        for e in ctx.spec["edges"]
        if e["source"] == ctx.node["id"] and e.get("on", "success") == "success"
    ]
    if ctx.node.get("agent"):
        agent = get_agent(ctx.node["agent"], ctx.lookup_token)
        ctx.step.agent = agent
        labels = [e["label"] for e in edges]
        prompt = task_prompt(ctx, default="Classify this request: {input}")
        prompt += "\n\nReply with the one label that fits best.\n" + CHOICE_LINE.format(
            options=" | ".join(labels)
        )
        reply = ctx.llm(
            agent,
            [
                {"role": "system", "content": system_prompt(agent)},
                {"role": "user", "content": prompt},
            ],
            stream=False,
        )
        chosen = _match_option(reply.text, labels)
        edge = next((e for e in edges if e["label"] == chosen), None) or next(
            e for e in edges if e.get("default")
        )
    else:
        state = {**ctx.state, "input": ctx.run.input}
        edge = next(
            (
                e
                for e in edges
                if not e.get("default")
                and e.get("condition")
                and condition_holds(e["condition"], state)
            ),
            None,
        )
        edge = edge or next(e for e in edges if e.get("default"))
    output = {"route": edge.get("label") or edge["target"], "target": edge["target"]}
    return f"route: {output['route']}", output


def _match_option(text: str, options: list[str]) -> str | None:
    cleaned = text.strip().strip(".").strip()
    for option in options:
        if cleaned.lower() == option.lower():
            return option
    for option in sorted(options, key=len, reverse=True):
        if option.lower() in cleaned.lower():
            return option
    return None


# --- parallel / join ------------------------------------------------------------------------


def parallel_node(ctx: StepContext):
    return "fan-out", None


def join_node(ctx: StepContext):
    """Gathers what each branch delivered (the engine decided the join is complete)."""
    delivered = {}
    for branch, outcome in sorted(ctx.step.arrivals.items()):
        source = outcome.get("source")
        delivered[branch] = {
            "status": outcome.get("status"),
            "output": ctx.state.get(source) if source else None,
        }
    failed = [b for b, o in delivered.items() if o["status"] != "succeeded"]
    text = f"joined {len(delivered)} branches" + (
        f"; failed: {', '.join(failed)}" if failed else ""
    )
    return text, {"branches": delivered, "failed": failed}


# --- supervisor -----------------------------------------------------------------------------


def supervisor_node(ctx: StepContext):
    """A supervisor LLM picks the next worker by name (or FINISH), for a bounded number of turns."""
    supervisor = get_agent(ctx.node["agent"], ctx.lookup_token)
    ctx.step.agent = supervisor
    workers = [get_agent(name, ctx.lookup_token) for name in ctx.node["workers"]]
    brief = task_prompt(ctx)
    transcript: list[dict] = []
    max_turns = ctx.node.get("max_turns", 6)
    for _turn in range(max_turns):
        chosen_names = [t["worker"] for t in transcript]
        ask = (
            f"Task: {brief}\n\nWork so far:\n{_transcript_text(transcript) or '(none)'}\n\n"
            "Pick the worker who should act next, or FINISH when the task is done.\n"
            + CHOICE_LINE.format(options=" | ".join([w.name for w in workers] + [FINISH]))
        )
        if chosen_names:
            ask += "\n" + CHOSEN_LINE.format(options=" | ".join(chosen_names))
        reply = ctx.llm(
            supervisor,
            [
                {"role": "system", "content": system_prompt(supervisor)},
                {"role": "user", "content": ask},
            ],
            stream=False,
        )
        choice = _match_option(reply.text, [w.name for w in workers] + [FINISH])
        if choice is None or choice == FINISH:
            break
        worker = next(w for w in workers if w.name == choice)
        text, _ = run_agent(
            ctx, worker, f"{brief}\n\nWork so far:\n{_transcript_text(transcript) or '(none)'}"
        )
        transcript.append({"worker": worker.name, "output": text})
    result = transcript[-1]["output"] if transcript else ""
    return result, {"result": result, "transcript": transcript, "turns": len(transcript)}


def _transcript_text(transcript: list[dict]) -> str:
    return "\n\n".join(f"[{t['worker']}] {t['output']}" for t in transcript)


# --- vote -----------------------------------------------------------------------------------


def vote_node(ctx: StepContext):
    """N agents answer the same task; a judge picks one (or synthesises). Disagreement is kept."""
    voters = [get_agent(name, ctx.lookup_token) for name in ctx.node["agents"]]
    judge = get_agent(ctx.node["judge"], ctx.lookup_token)
    ctx.step.agent = judge
    prompt = task_prompt(ctx)
    answers = []
    for voter in voters:
        text, _ = run_agent(ctx, voter, prompt)
        answers.append({"agent": voter.name, "answer": text})
    distinct = len({_normalise(a["answer"]) for a in answers})
    numbered = "\n\n".join(
        f"Answer {i + 1} ({a['agent']}):\n{a['answer']}" for i, a in enumerate(answers)
    )
    labels = [f"Answer {i + 1}" for i in range(len(answers))]
    if ctx.node.get("mode", "pick") == "pick":
        ask = f"Task: {prompt}\n\n{numbered}\n\nPick the best answer.\n" + CHOICE_LINE.format(
            options=" | ".join(labels)
        )
        reply = ctx.llm(
            judge,
            [{"role": "system", "content": system_prompt(judge)}, {"role": "user", "content": ask}],
            stream=False,
        )
        picked = _match_option(reply.text, labels) or labels[0]
        result = answers[labels.index(picked)]["answer"]
        verdict = {"picked": picked}
    else:
        ask = f"Task: {prompt}\n\n{numbered}\n\nSynthesise the best single answer from these."
        result, _ = run_agent(ctx, judge, ask)
        verdict = {"synthesised": True}
    output = {
        "result": result,
        "answers": answers,
        "distinct_answers": distinct,
        "agreement": distinct == 1,
        **verdict,
    }
    if (
        distinct > 1
        and ctx.node.get("escalate_on_disagreement")
        and not ctx.step.input.get("disagreement_approved")
    ):
        raise _escalate(ctx, "Voters disagree", {"output": output})
    return result, output


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


# --- debate ---------------------------------------------------------------------------------


def debate_node(ctx: StepContext):
    """Agents take turns critiquing the current answer until all agree or a round limit; a judge
    then decides. Older rounds are summarised once the transcript passes a token limit."""
    debaters = [get_agent(name, ctx.lookup_token) for name in ctx.node["agents"]]
    judge = get_agent(ctx.node["judge"], ctx.lookup_token)
    ctx.step.agent = judge
    prompt = task_prompt(ctx)
    max_rounds = ctx.node.get("max_rounds", 3)
    limit = ctx.node.get("summarise_after_tokens", 1500)
    summary = ""
    rounds: list[list[dict]] = []
    agreed = False
    for number in range(1, max_rounds + 1):
        turns = []
        for debater in debaters:
            so_far = _debate_text(summary, rounds + [turns])
            ask = (
                f"Question: {prompt}\n\nDebate so far:\n{so_far or '(you open the debate)'}"
                f"\n\nROUND {number}\nGive your answer or critique the others' answers. "
                "If you agree with the current answer, start your reply with AGREE."
            )
            text, _ = run_agent(ctx, debater, ask)
            turns.append({"agent": debater.name, "text": text})
        rounds.append(turns)
        if len(_debate_text(summary, rounds)) // 4 > limit and len(rounds) > 1:
            older = _debate_text(summary, rounds[:-1])
            summary, _ = run_agent(
                ctx,
                judge,
                "Summarise this debate in a few sentences, "
                f"keeping every open disagreement:\n\n{older}",
            )
            rounds = rounds[-1:]
        if number > 1 and all(t["text"].lstrip().upper().startswith("AGREE") for t in turns):
            agreed = True
            break
    verdict, _ = run_agent(
        ctx,
        judge,
        f"Question: {prompt}\n\nDebate:\n{_debate_text(summary, rounds)}\n\n"
        "As the judge, give the final answer.",
    )
    return verdict, {
        "result": verdict,
        "agreed": agreed,
        "rounds": number,
        "summary": summary,
        "transcript": rounds,
    }


def _debate_text(summary: str, rounds: list[list[dict]]) -> str:
    parts = [f"Summary of earlier rounds: {summary}"] if summary else []
    for turns in rounds:
        parts += [f"[{t['agent']}] {t['text']}" for t in turns]
    return "\n\n".join(parts)


# --- subworkflow ----------------------------------------------------------------------------


def subworkflow_node(ctx: StepContext):
    """Start a child run of another published workflow, once; the step waits for it."""
    from runs import engine

    child = Run.objects.filter(parent_step=ctx.step).order_by("-id").first()
    if child is not None and child.status == Run.SUCCEEDED:
        text = child.result if isinstance(child.result, str) else json.dumps(child.result)
        return text, child.result
    if child is not None and child.status in Run.TERMINAL:
        raise StepFailed(
            "permanent", f"sub-workflow run {child.pk} ended {child.status}: {child.error}"
        )
    if child is None:
        workflow = Workflow.objects.filter(slug=ctx.node["workflow"]).first()
        if workflow is None:
            raise StepFailed("permanent", f"workflow {ctx.node['workflow']!r} does not exist")
        version = (
            workflow.versions.filter(number=ctx.node["version"]).first()
            if ctx.node.get("version")
            else workflow.latest_version()
        )
        if version is None:
            raise StepFailed("permanent", f"workflow {workflow.slug!r} has no published version")
        child_input = render_value(
            ctx.node.get("input") or dict(ctx.run.input), {**ctx.state, "input": ctx.run.input}
        )
        try:
            engine.start_run(version, child_input, ctx.run.started_by, parent_step=ctx.step)
        except engine.RunInputError as exc:
            raise StepFailed(
                "permanent", f"sub-workflow input invalid: {'; '.join(exc.messages)}"
            ) from exc
    raise WaitingForHuman("waiting for the sub-workflow run")


# --- approval -------------------------------------------------------------------------------


def approval_node(ctx: StepContext):
    decision = ctx.step.input.get("decision")
    if decision is not None:
        if not decision["approved"]:
            raise ApprovalRejected(decision.get("comment") or "rejected")
        return f"approved: {decision.get('comment', '')}".strip(), {
            "approved": True,
            "comment": decision.get("comment", ""),
            "payload": decision.get("payload"),
        }
    raise _escalate(
        ctx,
        ctx.node.get("title") or f"Approve {ctx.node['id']}",
        {
            "prompt": render(ctx.node.get("prompt", ""), {**ctx.state, "input": ctx.run.input}),
        },
        kind="node",
    )


def _escalate(ctx: StepContext, title: str, payload: dict, kind: str = "escalation"):
    ctx.ask_human(kind, title, payload)
    return WaitingForHuman(title)


EXECUTORS = {
    "agent": agent_node,
    "tool": tool_node,
    "router": router_node,
    "parallel": parallel_node,
    "join": join_node,
    "supervisor": supervisor_node,
    "vote": vote_node,
    "debate": debate_node,
    "subworkflow": subworkflow_node,
    "approval": approval_node,
}
