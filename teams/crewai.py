"""Import a CrewAI project (`agents.yaml` + `tasks.yaml`, optionally a crew spec) as a workflow.

CrewAI describes agents (role, goal, backstory, llm, tools) and tasks (description,
expected_output, agent, context) separately and runs them with a *process*:

- sequential: each task runs in order and sees the output of the tasks in its `context` (the
  previous task's when it names none). Baton builds a pipeline of agent nodes, one per task, whose
  prompts quote the earlier outputs as `{task_key}` (a node's output lands in the state under its
  id, and Baton prompts use the same `{name}` interpolation as CrewAI).
- hierarchical: a manager (`manager_agent`, or one built from `manager_llm`) delegates the tasks
  to the agents. Baton builds one supervisor node with the agents as workers and the tasks as
  its brief.

`{placeholders}` in the texts become the workflow's inputs (required strings). Anything that
cannot come across (an unknown tool, a Python output class, an unsupported key) is reported in
the result's problems, never dropped silently.
"""

from __future__ import annotations

import re

from django.core.exceptions import ValidationError
from django.db import transaction

from teams.gallery import auto_layout
from teams.models import Agent, Role, Tool, Workflow
from teams.spec import SCHEMA_VERSION
from teams.yaml_io import (
    ImportFailed,
    ImportResult,
    load_yaml,
    plain,
    publish_if_valid,
    unique_name,
    unique_slug,
)

DEFAULT_MODEL = "scripted/baton"
PLACEHOLDER = re.compile(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})")
NODE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

# Bare model names CrewAI users write, and the LiteLLM provider prefix they mean.
_MODEL_PREFIXES = (
    (("gpt-", "o1", "o3", "o4", "chatgpt-", "text-embedding-"), "openai"),
    (("claude-",), "anthropic"),
    (("gemini-", "gemini/"), "gemini"),
    (("mistral-", "mixtral-", "codestral-", "open-mistral-", "open-mixtral-"), "mistral"),
    (("command-r", "command-a"), "cohere"),
    (("deepseek-",), "deepseek"),
)
# Agent keys Baton maps onto an Agent field: CrewAI key -> (field, converter).
_AGENT_NUMBERS = {
    "max_iter": ("max_tool_rounds", 32767),
    "max_retry_limit": ("max_retries", 32767),
    "max_execution_time": ("timeout_s", 2**31 - 1),
}
# Keys that only tune CrewAI's own runtime: nothing to carry over, nothing lost.
_AGENT_IGNORED = {
    "verbose",
    "allow_delegation",
    "cache",
    "memory",
    "max_rpm",
    "respect_context_window",
    "inject_date",
    "date_format",
    "use_system_prompt",
    "step_callback",
    "embedder",
    "system_template",
    "prompt_template",
    "response_template",
}
_TASK_IGNORED = {"output_file", "create_directory", "markdown", "verbose", "name", "callback"}
_CREW_KEYS = {"process", "manager_llm", "manager_agent", "name", "description"}
_CREW_IGNORED = {
    "verbose",
    "memory",
    "planning",
    "planning_llm",
    "cache",
    "max_rpm",
    "agents",
    "tasks",
    "embedder",
    "share_crew",
    "output_log_file",
}


def litellm_model(llm: str) -> tuple[str, bool]:
    """CrewAI's `llm` string as a LiteLLM model string, and whether the mapping is certain."""
    llm = llm.strip()
    if "/" in llm:
        return llm, True
    lowered = llm.lower()
    for prefixes, provider in _MODEL_PREFIXES:
        if lowered.startswith(prefixes):
            return f"{provider}/{llm}", True
    return llm, False


def placeholders(*texts: str) -> list[str]:
    """The `{name}` placeholders in the texts, in order of first appearance."""
    seen: dict[str, None] = {}
    for text in texts:
        for name in PLACEHOLDER.findall(text or ""):
            seen.setdefault(name, None)
    return list(seen)


def _one_line(value) -> str:
    return " ".join(str(value or "").split())


def _block(value) -> str:
    # YAML folded (>) and literal (|) blocks end with a newline; the text itself is what matters.
    return str(value or "").strip()


def _mapping(document, what: str) -> dict[str, dict]:
    if not isinstance(document, dict) or not document:
        raise ImportFailed(f"{what} must be a mapping of names to definitions.")
    for key, value in document.items():
        if not isinstance(value, dict):
            raise ImportFailed(f"{what}: '{key}' must be a mapping of settings.")
    return document


def looks_like_agents(document) -> bool:
    return (
        isinstance(document, dict)
        and bool(document)
        and all(isinstance(v, dict) and "role" in v for v in document.values())
    )


def looks_like_tasks(document) -> bool:
    return (
        isinstance(document, dict)
        and bool(document)
        and all(isinstance(v, dict) and "description" in v for v in document.values())
    )


def import_crewai(
    agents_yaml: bytes | str,
    tasks_yaml: bytes | str,
    crew_yaml: bytes | str | None = None,
    *,
    hierarchical: bool | None = None,
    owner=None,
    name: str = "",
) -> ImportResult:
    """Parse the CrewAI files and import them (see import_crewai_documents)."""
    agents = load_yaml(agents_yaml, "agents.yaml")
    tasks = load_yaml(tasks_yaml, "tasks.yaml")
    crew = load_yaml(crew_yaml, "The crew file") if crew_yaml else None
    if looks_like_tasks(agents) and looks_like_agents(tasks):
        raise ImportFailed("agents.yaml and tasks.yaml look swapped: pass the agents first.")
    return import_crewai_documents(
        agents, tasks, crew, hierarchical=hierarchical, owner=owner, name=name
    )


def import_crewai_documents(
    agents, tasks, crew=None, *, hierarchical: bool | None = None, owner=None, name: str = ""
) -> ImportResult:
    """Turn parsed CrewAI documents into roles, agents and a workflow, in one transaction.

    1. Check the shape of both files and the crew spec; every task names a known agent (a
       sequential crew needs one per task) and its context names earlier tasks.
    2. Create a role and an agent per CrewAI agent. Names already taken get a suffix, so an
       import never changes an existing agent; an identical existing row is reused.
    3. Build the spec (pipeline or supervisor), the input schema from the placeholders, and
       publish it when it validates.
    """
    agents = _mapping(plain(agents, "agents.yaml"), "agents.yaml")
    tasks = _mapping(plain(tasks, "tasks.yaml"), "tasks.yaml")
    crew = _crew_settings(plain(crew, "The crew's settings"))
    name = plain(name, "The workflow's name")
    process = str(crew.get("process") or "sequential").strip().lower()
    if process not in ("sequential", "hierarchical"):
        raise ImportFailed(f"Unknown crew process {process!r}: use sequential or hierarchical.")
    if hierarchical is None:
        hierarchical = process == "hierarchical"
    manager_key = crew.get("manager_agent")
    if manager_key is not None and (not isinstance(manager_key, str) or manager_key not in agents):
        raise ImportFailed(f"The crew's manager_agent '{manager_key}' is not in agents.yaml.")
    for key in tasks:
        if not NODE_ID.match(key):
            raise ImportFailed(f"Task name '{key}' must be letters, digits and _ . - only.")
    _check_tasks(agents, tasks, hierarchical)

    result = ImportResult()
    for key in crew:
        if key not in _CREW_KEYS | _CREW_IGNORED:
            result.problems.append(f"Crew setting '{key}' has no Baton equivalent and was ignored.")
    with transaction.atomic():
        agent_names = {}
        for key, definition in agents.items():
            agent = _make_agent(key, definition, _task_tools(key, tasks), result)
            agent_names[key] = agent.name
        texts = [
            _block(t.get("description")) + "\n" + _block(t.get("expected_output"))
            for t in tasks.values()
        ]
        texts += [
            f"{_block(a.get('role'))}\n{_block(a.get('goal'))}\n{_block(a.get('backstory'))}"
            for a in agents.values()
        ]
        inputs = [p for p in placeholders(*texts) if p not in tasks]
        if hierarchical:
            manager = _manager_agent(crew, agent_names, result)
            workers = [agent_names[k] for k in agents if k != manager_key]
            if not workers:
                raise ImportFailed(
                    "A hierarchical crew needs at least one agent besides its manager."
                )
            nodes, edges = _supervisor_graph(tasks, agent_names, manager, workers)
            for key, task in tasks.items():
                _report_task_keys(key, task, result)
                if (
                    task.get("output_json")
                    or task.get("output_pydantic")
                    or task.get("human_input")
                ):
                    result.problems.append(
                        f"Task '{key}': output_json, output_pydantic and human_input apply to "
                        "sequential crews only; ignored under the manager."
                    )
        else:
            if manager_key or crew.get("manager_llm"):
                result.problems.append(
                    "The crew names a manager but runs sequentially; the manager is not used."
                )
            nodes, edges = _pipeline_graph(tasks, agents, agent_names, result)
        spec = {
            "schema_version": SCHEMA_VERSION,
            "input_schema": {
                "type": "object",
                "properties": {key: {"type": "string"} for key in inputs},
                "required": inputs,
            },
            "nodes": nodes,
            "edges": edges,
        }
        title = _one_line(crew.get("name") or name) or "Imported CrewAI crew"
        process_name = "hierarchical" if hierarchical else "sequential"
        workflow = Workflow.objects.create(
            name=title[:200],
            slug=unique_slug(title),
            description=_block(crew.get("description"))
            or (f"Imported from a CrewAI project ({process_name} process, {len(tasks)} task(s))."),
            owner=owner,
            draft=spec,
            layout=auto_layout(spec),
        )
        result.workflow = workflow
        result.created.append(f"workflow '{workflow.slug}'")
        result.version = publish_if_valid(workflow, owner, "Imported from CrewAI", result)
    return result


def _crew_settings(crew) -> dict:
    if crew is None:
        return {}
    if not isinstance(crew, dict):
        raise ImportFailed("The crew file must be a mapping (process, manager_llm...).")
    # A crew file may wrap its settings in one named section, like agents.yaml does.
    if len(crew) == 1 and not (set(crew) & _CREW_KEYS):
        (inner,) = crew.values()
        if isinstance(inner, dict):
            crew = inner
    return crew


def _check_tasks(agents: dict, tasks: dict, hierarchical: bool) -> None:
    order = list(tasks)
    for index, (key, task) in enumerate(tasks.items()):
        if not _block(task.get("description")):
            raise ImportFailed(f"Task '{key}' has no description.")
        agent = task.get("agent")
        if agent is None and not hierarchical:
            raise ImportFailed(
                f"Task '{key}' names no agent; a sequential crew needs one per task "
                "(or import it as hierarchical)."
            )
        if agent is not None and (not isinstance(agent, str) or agent not in agents):
            raise ImportFailed(f"Task '{key}' names agent '{agent}', which is not in agents.yaml.")
        context = task.get("context") or []
        if not isinstance(context, list):
            raise ImportFailed(f"Task '{key}': context must be a list of task names.")
        for other in context:
            if not isinstance(other, str) or other not in tasks:
                raise ImportFailed(f"Task '{key}': context names unknown task '{other}'.")
            if order.index(other) >= index:
                raise ImportFailed(f"Task '{key}': context task '{other}' does not run before it.")


def _task_tools(agent_key: str, tasks: dict) -> list:
    """Tools the tasks of this agent ask for (Baton gives tools to agents, not tasks)."""
    names = []
    for task in tasks.values():
        if task.get("agent") == agent_key:
            value = task.get("tools") or []
            names += value if isinstance(value, list) else [value]
    return names


def _find_tool(name: str) -> Tool | None:
    return Tool.objects.filter(name=name).first() or Tool.objects.filter(name__iexact=name).first()


def _make_role(name: str, goal: str, backstory: str, result: ImportResult) -> Role:
    name = name[:120] or "Crew member"
    existing = Role.objects.filter(name=name).first()
    if existing and existing.goal == goal and existing.backstory == backstory:
        return existing
    role = Role.objects.create(name=unique_name(Role, name), goal=goal, backstory=backstory)
    result.created.append(f"role '{role.name}'")
    return role


def _make_agent(key: str, definition: dict, task_tools: list, result: ImportResult) -> Agent:
    role_text = _one_line(definition.get("role")) or key
    goal = _block(definition.get("goal"))
    if not goal:
        result.problems.append(f"Agent '{key}' has no goal.")
    role = _make_role(role_text, goal, _block(definition.get("backstory")), result)

    fields: dict = {"model": DEFAULT_MODEL}
    llm = definition.get("llm")
    if isinstance(llm, dict):
        if isinstance(llm.get("temperature"), int | float):
            fields["temperature"] = float(llm["temperature"])
        if llm.get("base_url") or llm.get("api_base"):
            fields["api_base"] = str(llm.get("base_url") or llm.get("api_base"))[:300]
        llm = llm.get("model")
    if llm:
        fields["model"], certain = litellm_model(str(llm))
        if not certain:
            result.problems.append(
                f"Agent '{key}': llm '{llm}' has no provider prefix Baton recognises; it was "
                "kept as written. Check it is a LiteLLM model string (provider/model)."
            )
    for crew_key, (field_name, limit) in _AGENT_NUMBERS.items():
        value = definition.get(crew_key)
        if value is None:
            continue
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            fields[field_name] = min(int(value), limit)
        else:
            result.problems.append(f"Agent '{key}': {crew_key} {value!r} is not a number; ignored.")
    for crew_key in definition:
        if crew_key not in {
            "role",
            "goal",
            "backstory",
            "llm",
            "tools",
            *_AGENT_NUMBERS,
            *_AGENT_IGNORED,
        }:
            result.problems.append(
                f"Agent '{key}': '{crew_key}' has no Baton equivalent and was ignored."
            )

    tools, seen = [], set()
    raw_tools = definition.get("tools") or []
    for tool_name in (raw_tools if isinstance(raw_tools, list) else [raw_tools]) + task_tools:
        tool_name = str(tool_name)
        if tool_name in seen:
            continue
        seen.add(tool_name)
        tool = _find_tool(tool_name)
        if tool is None:
            result.problems.append(
                f"Agent '{key}': unknown tool '{tool_name}'. Baton has no tool of that name; "
                "the agent was created without it (add the tool in the admin, then give it to "
                "the agent)."
            )
        else:
            tools.append(tool)

    # Always a new agent: an existing one of that name may serve other workflows.
    agent = Agent(name=unique_name(Agent, key), role=role, **fields)
    try:
        agent.full_clean()
    except ValidationError as exc:
        raise ImportFailed(f"Agent '{key}' cannot be created: {' '.join(exc.messages)}") from None
    agent.save()
    agent.tools.set(tools)
    result.created.append(f"agent '{agent.name}' ({agent.model})")
    return agent


def _manager_agent(crew: dict, agent_names: dict[str, str], result: ImportResult) -> str:
    if crew.get("manager_agent"):
        return agent_names[crew["manager_agent"]]
    llm = crew.get("manager_llm")
    model = DEFAULT_MODEL
    if llm:
        model, certain = litellm_model(str(llm.get("model") if isinstance(llm, dict) else llm))
        if not certain:
            result.problems.append(
                f"manager_llm '{llm}' has no provider prefix Baton recognises; kept as written."
            )
    role = _make_role(
        "Crew Manager",
        "Coordinate the crew: hand each task to the best worker, check the results and deliver "
        "the final answer.",
        "An experienced project manager who delegates well and checks every deliverable.",
        result,
    )
    agent = Agent.objects.create(name=unique_name(Agent, "crew-manager"), role=role, model=model)
    result.created.append(f"agent '{agent.name}' ({agent.model}) as the crew's manager")
    return agent.name


def _role_preamble(definition: dict) -> str:
    """CrewAI fills {placeholders} in an agent's role, goal and backstory from the inputs.
    Baton's system prompt shows a role as written, so a role that uses placeholders is restated
    in the task prompt, where Baton does fill them from the run's state."""
    role, goal = _one_line(definition.get("role")), _block(definition.get("goal"))
    backstory = _block(definition.get("backstory"))
    if not placeholders(role, goal, backstory):
        return ""
    lines = [f"For this task you are: {role}."]
    if goal:
        lines.append(f"Your goal: {goal}")
    if backstory and placeholders(backstory):
        lines.append(f"Backstory: {backstory}")
    return "\n".join(lines) + "\n\n"


def _task_prompt(key: str, task: dict, context: list[str]) -> str:
    parts = [_block(task.get("description"))]
    if context:
        parts.append(
            "This is the context you are working with (the results of earlier tasks):\n\n"
            + "\n\n".join(f"## {other}\n{{{other}}}" for other in context)
        )
    expected = _block(task.get("expected_output"))
    if expected:
        parts.append(f"This is the expected criteria for your final answer: {expected}")
    return "\n\n".join(parts)


def _output_schema(key: str, task: dict, result: ImportResult) -> dict | None:
    schema = task.get("output_json")
    if schema is None:
        if task.get("output_pydantic"):
            result.problems.append(
                f"Task '{key}': output_pydantic names a Python class; Baton cannot import "
                "code, so the output is free text. Add an output JSON schema in the editor."
            )
        return None
    if isinstance(schema, dict):
        return schema
    result.problems.append(
        f"Task '{key}': output_json '{schema}' names a Python class; Baton cannot import code, "
        "so the output is free text. Add an output JSON schema in the editor."
    )
    return None


def _pipeline_graph(
    tasks: dict, agents: dict, agent_names: dict[str, str], result: ImportResult
) -> tuple[list[dict], list[dict]]:
    nodes: list[dict] = []
    edges: list[dict] = []
    previous_task = None
    previous_node = None
    for key, task in tasks.items():
        # CrewAI hands a sequential task the previous task's output when it names no context.
        context = task.get("context") or ([previous_task] if previous_task else [])
        node = {
            "id": key,
            "kind": "agent",
            "agent": agent_names[task["agent"]],
            "label": key.replace("_", " ").capitalize(),
            "prompt": _role_preamble(agents[task["agent"]]) + _task_prompt(key, task, context),
        }
        schema = _output_schema(key, task, result)
        if schema is not None:
            node["output_schema"] = schema
        _report_task_keys(key, task, result)
        nodes.append(node)
        if previous_node:
            edges.append({"source": previous_node, "target": key})
        previous_node = key
        if task.get("human_input"):
            # CrewAI asks a person to review this task's answer: Baton's approval gate.
            gate = unique_id(f"{key}_review", tasks, nodes)
            nodes.append(
                {
                    "id": gate,
                    "kind": "approval",
                    "label": f"Review {key.replace('_', ' ')}",
                    "title": f"Review the result of {key}",
                    "prompt": f"{{{key}}}",
                }
            )
            edges.append({"source": key, "target": gate})
            previous_node = gate
        previous_task = key
    return nodes, edges


def unique_id(base: str, tasks: dict, nodes: list[dict]) -> str:
    taken = set(tasks) | {n["id"] for n in nodes}
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}_{n}"
    return candidate


def _report_task_keys(key: str, task: dict, result: ImportResult) -> None:
    known = {
        "description",
        "expected_output",
        "agent",
        "context",
        "tools",
        "output_json",
        "output_pydantic",
        "human_input",
        *_TASK_IGNORED,
    }
    for task_key in task:
        if task_key not in known:
            result.problems.append(
                f"Task '{key}': '{task_key}' has no Baton equivalent and was ignored."
            )


def _supervisor_graph(
    tasks: dict, agent_names: dict[str, str], manager: str, workers: list[str]
) -> tuple[list[dict], list[dict]]:
    lines = [
        "You manage a crew. Get these tasks done in order by handing each to the best worker, "
        "check each result, and finish with the final deliverable.",
    ]
    for number, (key, task) in enumerate(tasks.items(), start=1):
        lines.append(f"\n{number}. {key}")
        if task.get("agent"):
            lines.append(f"   Suggested worker: {agent_names[task['agent']]}")
        lines.append(f"   {_block(task.get('description'))}")
        expected = _block(task.get("expected_output"))
        if expected:
            lines.append(f"   Expected output: {expected}")
    node = {
        "id": "manager",
        "kind": "supervisor",
        "label": "Crew manager",
        "agent": manager,
        "workers": workers,
        "max_turns": max(4, 2 * len(tasks)),
        "prompt": "\n".join(lines),
    }
    return [node], []
