"""Plain helpers that make the objects tests need."""

from runs import engine
from runs.models import Run, Step
from teams.models import Agent, Role, Tool, Workflow


def make_role(name: str = "Researcher", goal: str = "Find facts", backstory: str = "") -> Role:
    role, _ = Role.objects.get_or_create(name=name, defaults={"goal": goal, "backstory": backstory})
    return role


def make_agent(
    name: str = "researcher", model: str = "scripted/baton", tools=(), **fields
) -> Agent:
    role = fields.pop("role", None) or make_role(f"{name} role", goal=f"Act as {name}")
    agent = Agent.objects.create(name=name, role=role, model=model, **fields)
    agent.tools.set(tools)
    return agent


def make_tool(name: str = "calculator", entrypoint: str = "baton.calculator", **fields) -> Tool:
    fields.setdefault("description", f"The {name} tool")
    fields.setdefault(
        "args_schema",
        {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    )
    return Tool.objects.create(name=name, entrypoint=entrypoint, **fields)


def make_workflow(
    spec: dict, owner=None, members=(), slug: str = "wf", publish: bool = True, **fields
) -> Workflow:
    spec = {"input_schema": {"type": "object", "properties": {}}, **spec}
    workflow = Workflow.objects.create(
        name=fields.pop("name", slug), slug=slug, owner=owner, draft=spec, **fields
    )
    workflow.members.set(members)
    if publish:
        workflow.publish(user=owner, note="test")
    return workflow


def pipeline_spec(*agent_names: str, prompt: str = "Work on {topic}") -> dict:
    nodes = [{"id": name, "kind": "agent", "agent": name, "prompt": prompt} for name in agent_names]
    edges = [{"source": a, "target": b} for a, b in zip(agent_names, agent_names[1:], strict=False)]
    return {
        "input_schema": {
            "type": "object",
            "properties": {"topic": {"type": "string"}},
            "required": ["topic"],
        },
        "nodes": nodes,
        "edges": edges,
    }


def fan_out_spec(*agent_names: str, prompt: str = "On {topic}") -> dict:
    """A parallel node "fan" -> one agent node per name -> a join "gather"."""
    return {
        "input_schema": {"type": "object", "properties": {"topic": {"type": "string"}}},
        "nodes": [
            {"id": "fan", "kind": "parallel"},
            *({"id": n, "kind": "agent", "agent": n, "prompt": prompt} for n in agent_names),
            {"id": "gather", "kind": "join"},
        ],
        "edges": [
            *({"source": "fan", "target": n} for n in agent_names),
            *({"source": n, "target": "gather"} for n in agent_names),
        ],
    }


def silent_run(spec: dict, owner) -> tuple[Run, Step]:
    """A queued run whose entry step no doorbell announced (created under the stop switch,
    then set queued behind the engine's back), so only the test executes it."""
    workflow = make_workflow(spec, owner=owner)
    engine.set_stop_everything(True, owner)
    run = engine.start_run(workflow.latest_version(), {"topic": "one task"}, owner)
    engine.set_stop_everything(False, owner)
    Run.objects.filter(pk=run.pk).update(status=Run.QUEUED, blocked_on="")
    return run, run.steps.get()
