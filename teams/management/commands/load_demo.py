"""Load Baton's demo team: roles, tools, agents and three published workflows.

`make run` calls this on every start, so it is idempotent and, by default, never overwrites what a
user changed: rows that exist are left alone. `--reset` puts every demo row back to its
definition in teams/demo.py (publishing a new version only where the spec differs).
"""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from teams import demo
from teams.models import Agent, Role, Tool, Workflow
from teams.spec import upgrade_spec, validate_spec

_WORKFLOW_FIELDS = (
    "name",
    "description",
    "max_cost_per_run",
    "max_tokens_per_run",
    "max_tokens_per_step",
    "max_steps_per_run",
    "max_wall_s",
    "budget_policy",
)


class Command(BaseCommand):
    help = "Create the demo roles, tools, agents and workflows (idempotent)."

    def add_arguments(self, parser):
        parser.add_argument(
            "--reset",
            action="store_true",
            help="Restore the demo rows to their definitions, undoing edits made to them.",
        )

    def handle(self, *args, reset: bool = False, **options):
        with transaction.atomic():
            created = load_demo(reset=reset)
        self.stdout.write(
            self.style.SUCCESS(
                "Demo data ready: "
                f"{created['roles']} role(s), {created['tools']} tool(s), "
                f"{created['agents']} agent(s), {created['workflows']} workflow(s) created, "
                f"{created['versions']} version(s) published."
            )
        )


def _save(model, lookup: dict, fields: dict, reset: bool):
    """Create the row if it is missing; overwrite an existing one only when resetting."""
    if reset:
        return model.objects.update_or_create(**lookup, defaults=fields)
    return model.objects.get_or_create(**lookup, defaults=fields)


def load_demo(reset: bool = False) -> dict[str, int]:
    """Create what is missing (or restore everything with `reset`); return what was created.

    1. Roles, then tools, then agents (agents refer to both by name).
    2. Each workflow spec is checked against the names that now exist: a broken demo spec is a
       bug in teams/demo.py and stops the command instead of publishing something unusable.
    3. A workflow gets a new version only when it has none yet or, with `reset`, when the latest
       version's spec differs from the demo spec, so re-running never piles up versions.
    """
    created = dict.fromkeys(("roles", "tools", "agents", "workflows", "versions"), 0)

    roles = {}
    for spec in demo.ROLES:
        fields = {k: v for k, v in spec.items() if k != "name"}
        roles[spec["name"]], new = _save(Role, {"name": spec["name"]}, fields, reset)
        created["roles"] += new

    tools = {}
    for spec in demo.TOOLS:
        fields = {
            "entrypoint": spec["entrypoint"],
            "description": spec["description"],
            "args_schema": spec["args_schema"],
            "side_effect": spec.get("side_effect", False),
            "requires_approval": spec.get("requires_approval", False),
        }
        tools[spec["name"]], new = _save(Tool, {"name": spec["name"]}, fields, reset)
        created["tools"] += new

    for spec in demo.AGENTS:
        fields = {
            "role": roles[spec["role"]],
            "model": demo.DEMO_MODEL,
            "system_prompt": spec["system_prompt"],
            "temperature": spec.get("temperature", 0.2),
            "max_tokens": 1024,
        }
        agent, new = _save(Agent, {"name": spec["name"]}, fields, reset)
        if new or reset:
            agent.tools.set([tools[name] for name in spec.get("tools", [])])
        created["agents"] += new

    known = {
        "known_agents": set(Agent.objects.values_list("name", flat=True)),
        "known_tools": set(Tool.objects.values_list("name", flat=True)),
        "known_workflows": set(Workflow.objects.values_list("slug", flat=True))
        | {w["slug"] for w in demo.WORKFLOWS},
    }
    owner = get_user_model().objects.filter(is_superuser=True).order_by("pk").first()
    for spec in demo.WORKFLOWS:
        problems = validate_spec(spec["spec"], **known)
        if problems:
            raise CommandError(
                f"Demo workflow {spec['slug']} is invalid: " + "; ".join(map(str, problems))
            )
        fields = {name: spec[name] for name in _WORKFLOW_FIELDS}
        workflow, new = _save(
            Workflow, {"slug": spec["slug"]}, {**fields, "draft": spec["spec"]}, reset
        )
        created["workflows"] += new
        if workflow.owner_id is None and owner is not None:
            workflow.owner = owner
            workflow.save(update_fields=["owner", "updated_at"])
        latest = workflow.latest_version()
        if latest is None or (reset and latest.get_spec() != upgrade_spec(spec["spec"])):
            workflow.publish(user=owner, note=demo.DEMO_NOTE, spec=spec["spec"])
            created["versions"] += 1
    return created
