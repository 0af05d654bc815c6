"""Native YAML import and export: one file holds a workflow with its roles, agents and tools.

The file format (`baton_export: 1`)::

    baton_export: 1
    schema_version: 2            # the spec format of `workflow.draft` (see teams/spec.py)
    workflow: {name, slug, description, budgets: {...}, approver_group, layout, draft}
    roles: [{name, goal, backstory}]
    tools: [{name, description, entrypoint, args_schema, side_effect, requires_approval}]
    agents: [{name, role, model, fallback_models, api_base, temperature, max_tokens,
              system_prompt, tools: [names], max_retries, timeout_s, max_tool_rounds}]

Tools carry a reference to code (`entrypoint`), never code: an entrypoint that is not in
teams.tools.REGISTRY is reported and the tool is not created. Only PyYAML's safe loader and dumper
are used. Exporting, importing into an empty database and exporting again gives the same bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import yaml
from django.core.exceptions import ValidationError
from django.core.validators import validate_slug
from django.db import transaction
from django.utils.text import slugify

from teams import tools as tool_registry
from teams.models import Agent, Role, Tool, Workflow, WorkflowVersion
from teams.spec import SCHEMA_VERSION, agents_used, upgrade_spec, validate_spec

EXPORT_MARKER = "baton_export"
EXPORT_FORMAT = 1
MAX_IMPORT_BYTES = 1024 * 1024
# Anchors and aliases let a small file describe a huge structure; past this many values the
# document is refused instead of being expanded into the database.
MAX_VALUES = 200_000

BUDGET_FIELDS = (
    "max_cost_per_run",
    "max_tokens_per_run",
    "max_tokens_per_step",
    "max_steps_per_run",
    "max_wall_s",
    "daily_cost_cap",
    "monthly_cost_cap",
    "budget_policy",
)
AGENT_FIELDS = (
    "model",
    "fallback_models",
    "api_base",
    "temperature",
    "max_tokens",
    "system_prompt",
    "max_retries",
    "timeout_s",
    "max_tool_rounds",
)
TOOL_FIELDS = ("description", "entrypoint", "args_schema", "side_effect", "requires_approval")


class ImportFailed(Exception):
    """The input cannot be imported at all. The message is one line, written for a person."""


@dataclass
class ImportResult:
    """What an import did. `problems` are things that did not come across as written (an unknown
    tool, an invalid spec that was kept as a draft...), never silently dropped."""

    workflow: Workflow | None = None
    version: WorkflowVersion | None = None
    created: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


# --- reading YAML ---------------------------------------------------------------------------


def load_yaml(data: bytes | str, what: str = "The file") -> object:
    """Parse untrusted YAML into plain JSON-able data, or raise ImportFailed.

    1. Refuse more than MAX_IMPORT_BYTES before parsing anything.
    2. Parse with yaml.safe_load (no Python objects, ever).
    3. Turn the result into JSON-able values (dates become ISO strings, keys become strings),
       refusing anything JSON cannot hold and documents that aliases blow up.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if len(raw) > MAX_IMPORT_BYTES:
        raise ImportFailed(
            f"{what} is too large ({len(raw):,} bytes); the limit is {MAX_IMPORT_BYTES:,} bytes."
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ImportFailed(f"{what} is not UTF-8 text.") from None
    try:
        document = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = exc.problem or exc.context or "syntax error"
        raise ImportFailed(f"{what} is not valid YAML{where}: {reason}.") from None
    except yaml.YAMLError as exc:
        raise ImportFailed(f"{what} is not valid YAML: {exc}.") from None
    except RecursionError:
        raise ImportFailed(f"{what} is nested too deeply.") from None
    except ValueError as exc:
        # PyYAML's constructors: an impossible date (2024-02-30), an integer of more than 4300
        # digits, `!!int 1e5`...
        raise ImportFailed(f"{what} has a value YAML cannot read: {exc}.") from None
    return plain(document, what)


def plain(document, what: str):
    """`document` as data Baton can store as JSON, or ImportFailed saying what is wrong."""
    try:
        return _plain(document, [MAX_VALUES], what)
    except RecursionError:
        raise ImportFailed(f"{what} is nested too deeply.") from None


def _plain(value, budget: list[int], what: str):
    budget[0] -= 1
    if budget[0] < 0:
        raise ImportFailed(f"{what} expands to more than {MAX_VALUES:,} values.")
    if isinstance(value, str):
        return _text_value(value, what)
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ImportFailed(f"{what} contains a number JSON cannot hold ({value}).")
        return value
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, list):
        return [_plain(item, budget, what) for item in value]
    if isinstance(value, dict):
        return {
            _text_value(str(key), what): _plain(item, budget, what) for key, item in value.items()
        }
    raise ImportFailed(f"{what} contains a value Baton cannot store ({type(value).__name__}).")


def _text_value(value: str, what: str) -> str:
    """YAML escapes can write what no database stores: a lone surrogate (no UTF-8 form) or
    NUL (PostgreSQL refuses it in text)."""
    if "\x00" in value:
        raise ImportFailed(f"{what} contains a NUL character, which Baton cannot store.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ImportFailed(f"{what} contains text that is not valid Unicode.") from None
    return value


# --- writing YAML ---------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes multi-line text (prompts, backstories) as readable blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str):
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _represent_str)


def dump_yaml(data: dict) -> str:
    return yaml.dump(
        data,
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=False,
        width=100,
    )


def _decimal_text(value: Decimal | None) -> str | None:
    # A string, not a float, so a budget survives the trip exactly; normalised so "0.50" read
    # back from the database as "0.500000" still exports the same.
    return None if value is None else format(value.normalize(), "f")


def workflow_spec(workflow: Workflow) -> dict:
    """The spec an export carries: the draft, or the latest version's spec when there is none."""
    if workflow.draft:
        return upgrade_spec(workflow.draft)
    latest = workflow.latest_version()
    return latest.get_spec() if latest else upgrade_spec({})


def export_data(workflow: Workflow) -> dict:
    """The workflow, and every role, agent and tool it refers to, as plain data."""
    spec = workflow_spec(workflow)
    agents = list(
        Agent.objects.filter(name__in=agents_used(spec))
        .select_related("role")
        .prefetch_related("tools")
        .order_by("name")
    )
    nodes = spec.get("nodes") if isinstance(spec.get("nodes"), list) else []
    tool_names = {
        node["tool"]
        for node in nodes
        if isinstance(node, dict)
        and node.get("kind") == "tool"
        and isinstance(node.get("tool"), str)
    }
    for agent in agents:
        tool_names.update(t.name for t in agent.tools.all())
    tools = Tool.objects.filter(name__in=tool_names).select_related("approver_group")
    roles = sorted({agent.role for agent in agents}, key=lambda role: role.name)

    workflow_data = {
        "name": workflow.name,
        "slug": workflow.slug,
        "description": workflow.description,
        "budgets": {
            "max_cost_per_run": _decimal_text(workflow.max_cost_per_run),
            "max_tokens_per_run": workflow.max_tokens_per_run,
            "max_tokens_per_step": workflow.max_tokens_per_step,
            "max_steps_per_run": workflow.max_steps_per_run,
            "max_wall_s": workflow.max_wall_s,
            "daily_cost_cap": _decimal_text(workflow.daily_cost_cap),
            "monthly_cost_cap": _decimal_text(workflow.monthly_cost_cap),
            "budget_policy": workflow.budget_policy,
        },
    }
    if workflow.approver_group_id:
        workflow_data["approver_group"] = workflow.approver_group.name
    workflow_data["layout"] = _ordered(workflow.layout or {})
    workflow_data["draft"] = _ordered_spec(spec)

    tools_data = []
    for tool in tools.order_by("name"):
        item = {"name": tool.name, **{name: _ordered(getattr(tool, name)) for name in TOOL_FIELDS}}
        if tool.approver_group_id:
            item["approver_group"] = tool.approver_group.name
        tools_data.append(item)

    return {
        EXPORT_MARKER: EXPORT_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "workflow": workflow_data,
        "roles": [
            {"name": role.name, "goal": role.goal, "backstory": role.backstory} for role in roles
        ],
        "tools": tools_data,
        "agents": [
            {
                "name": agent.name,
                "role": agent.role.name,
                **{name: getattr(agent, name) for name in AGENT_FIELDS},
                "api_base": without_credentials(agent.api_base),
                "tools": sorted(t.name for t in agent.tools.all()),
            }
            for agent in agents
        ],
    }


def _ordered(value):
    """JSON columns come back from PostgreSQL (jsonb) with their keys reordered: sort them, so
    an export reads the same whichever database it came from."""
    if isinstance(value, dict):
        return {key: _ordered(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_ordered(item) for item in value]
    return value


_SPEC_KEYS = ("schema_version", "entry", "input_schema", "state_schema", "nodes", "edges")


def _ordered_spec(spec: dict) -> dict:
    """A spec with its top-level keys in reading order and everything below sorted."""
    first = {key: _ordered(spec[key]) for key in _SPEC_KEYS if key in spec}
    return {**first, **{key: _ordered(spec[key]) for key in sorted(spec) if key not in first}}


def without_credentials(url: str) -> str:
    """An api_base may carry a key (https://user:key@host/v1, ?api_key=...). An export file is
    shared with whoever may see the workflow, so it never does."""
    if not url:
        return url
    parts = urlsplit(url)
    query = [
        (k, v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
        if not re.search(r"key|token|secret|password|auth", k, re.I)
    ]
    return urlunsplit(
        parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1], query=urlencode(query))
    )


def export_workflow(workflow: Workflow) -> str:
    return dump_yaml(export_data(workflow))


# --- importing ------------------------------------------------------------------------------


def is_native(document: object) -> bool:
    return isinstance(document, dict) and EXPORT_MARKER in document


def import_yaml(
    data: bytes | str, *, owner=None, replace: bool = False, trusted: bool = True
) -> ImportResult:
    """Import a native export file. Raises ImportFailed when it cannot be imported at all."""
    document = load_yaml(data)
    if not is_native(document):
        raise ImportFailed(
            f"This is not a Baton export (no `{EXPORT_MARKER}` key). For a CrewAI project, "
            "upload its agents.yaml and tasks.yaml together."
        )
    return import_document(document, owner=owner, replace=replace, trusted=trusted)


def import_document(
    document: dict, *, owner=None, replace: bool = False, trusted: bool = True
) -> ImportResult:
    """Create or update everything a native export describes, in one transaction.

    `trusted` (staff, the command line) lets the file update existing roles, agents and tools of
    the same name and create tools. Otherwise nothing shared is changed: an existing row that
    differs is left alone and the file's version is created under a new name (the spec is
    rewritten to use it), and tools are only referenced, never created.

    1. Check the envelope: format, schema version, the workflow section.
    2. Roles, then tools, then agents (agents refer to both by name).
    3. The workflow: a fresh slug when taken (unless `replace`), the draft upgraded to the
       current schema, the budgets, the layout.
    4. Publish a version when the spec is valid against what now exists; otherwise keep the
       draft and report each problem.
    """
    if document.get(EXPORT_MARKER) != EXPORT_FORMAT:
        raise ImportFailed(
            f"Unsupported export format {document.get(EXPORT_MARKER)!r}; this Baton reads "
            f"format {EXPORT_FORMAT}."
        )
    schema_version = document.get("schema_version", SCHEMA_VERSION)
    if (
        not isinstance(schema_version, int)
        or isinstance(schema_version, bool)
        or not (1 <= schema_version <= SCHEMA_VERSION)
    ):
        raise ImportFailed(
            f"Unsupported schema_version {schema_version!r}; this Baton reads 1 to "
            f"{SCHEMA_VERSION}."
        )
    data = document.get("workflow")
    if not isinstance(data, dict):
        raise ImportFailed("The file has no `workflow` section.")
    draft = data.get("draft", {})
    if not isinstance(draft, dict):
        raise ImportFailed("`workflow.draft` must be a mapping (the workflow spec).")
    for section in ("roles", "tools", "agents"):
        if not isinstance(document.get(section) or [], list):
            raise ImportFailed(f"`{section}` must be a list.")

    result = ImportResult()
    with transaction.atomic():
        roles = _import_roles(document.get("roles") or [], trusted, result)
        tools = _import_tools(document.get("tools") or [], trusted, result)
        agent_names = _import_agents(document.get("agents") or [], roles, tools, trusted, result)
        spec = upgrade_spec(draft, from_version=schema_version)
        spec = rename_agents(spec, agent_names)
        workflow = _import_workflow(data, spec, owner, replace, result)
        result.workflow = workflow
        result.version = publish_if_valid(workflow, owner, "Imported from YAML", result)
    return result


def publish_if_valid(workflow: Workflow, owner, note: str, result: ImportResult):
    """Publish the draft when it is valid against the agents, tools and workflows that exist."""
    problems = validate_spec(
        workflow.draft,
        known_agents=set(Agent.objects.values_list("name", flat=True)),
        known_tools=set(Tool.objects.values_list("name", flat=True)),
        known_workflows=set(Workflow.objects.values_list("slug", flat=True)),
    )
    if problems:
        result.problems += [f"Not published, the draft needs fixing: {p}" for p in problems]
        return None
    version = workflow.publish(user=owner, note=note)
    result.created.append(f"version {version.number} of workflow '{workflow.slug}'")
    return version


def rename_agents(spec: dict, names: dict[str, str]) -> dict:
    """The spec with agent references renamed per `names` (old -> new)."""
    names = {old: new for old, new in names.items() if old != new}
    if not names:
        return spec
    for node in spec.get("nodes") or []:
        if not isinstance(node, dict):
            continue
        for key in ("agent", "judge"):
            if isinstance(node.get(key), str):
                node[key] = names.get(node[key], node[key])
        for key in ("agents", "workers"):
            if isinstance(node.get(key), list):
                node[key] = [names.get(a, a) if isinstance(a, str) else a for a in node[key]]
    return spec


def unique_name(model, base: str, field_name: str = "name", max_length: int = 120) -> str:
    """`base`, or `base-2`, `base-3`... whichever is free in `model`."""
    base = base[:max_length]
    candidate, n = base, 1
    while model.objects.filter(**{field_name: candidate}).exists():
        n += 1
        suffix = f"-{n}"
        candidate = base[: max_length - len(suffix)] + suffix
    return candidate


def unique_slug(base: str) -> str:
    return unique_name(Workflow, slugify(base)[:120] or "workflow", "slug")


def _error_text(exc: ValidationError) -> str:
    if hasattr(exc, "message_dict"):
        return "; ".join(
            f"{name}: {' '.join(messages)}" if name != "__all__" else " ".join(messages)
            for name, messages in exc.message_dict.items()
        )
    return " ".join(exc.messages)


def _named_items(items: list, what: str, result: ImportResult) -> list[dict]:
    good = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            result.problems.append(f"{what} {index + 1} has no name; skipped.")
            continue
        good.append(item)
    return good


def _text(item: dict, key: str) -> str:
    value = item.get(key)
    return "" if value is None else str(value)


def _import_roles(items: list, trusted: bool, result: ImportResult) -> dict[str, Role]:
    roles: dict[str, Role] = {}
    for item in _named_items(items, "Role", result):
        name = item["name"]
        fields = {"goal": _text(item, "goal"), "backstory": _text(item, "backstory")}
        existing = Role.objects.filter(name=name).first()
        if existing and all(getattr(existing, k) == v for k, v in fields.items()):
            roles[name] = existing
            continue
        if existing and not trusted:
            role = Role(name=unique_name(Role, name), **fields)
        else:
            role = existing or Role(name=name)
            for key, value in fields.items():
                setattr(role, key, value)
        try:
            role.full_clean()
        except ValidationError as exc:
            result.problems.append(f"Role '{name}' not imported: {_error_text(exc)}")
            continue
        role.save()
        roles[name] = role
        if existing is role:
            result.created.append(f"updated role '{role.name}'")
        else:
            result.created.append(f"role '{role.name}'")
            if role.name != name:
                result.problems.append(
                    f"A different role named '{name}' exists; imported as '{role.name}'."
                )
    return roles


def _group(name, result: ImportResult, owner_label: str):
    from django.contrib.auth.models import Group

    if not name:
        return None
    group = Group.objects.filter(name=str(name)).first()
    if group is None:
        result.problems.append(
            f"{owner_label}: approver group '{name}' does not exist here; left unset."
        )
    return group


def _import_tools(items: list, trusted: bool, result: ImportResult) -> dict[str, Tool]:
    tools: dict[str, Tool] = {}
    for item in _named_items(items, "Tool", result):
        name = item["name"]
        existing = Tool.objects.filter(name=name).first()
        entrypoint = _text(item, "entrypoint")
        if entrypoint not in tool_registry.REGISTRY:
            if existing:
                tools[name] = existing
            result.problems.append(
                f"Tool '{name}' not imported: its entrypoint '{entrypoint}' is not in this "
                "Baton's tool registry."
                + (" The existing tool of that name is used." if existing else "")
            )
            continue
        if not trusted:
            if existing:
                tools[name] = existing
                if any(getattr(existing, k) != item.get(k) for k in ("entrypoint", "args_schema")):
                    result.problems.append(
                        f"Tool '{name}' differs from the one on this Baton; the existing one "
                        "is used."
                    )
            else:
                result.problems.append(
                    f"Tool '{name}' is not on this Baton and only staff may add tools; "
                    "ask an administrator to import it."
                )
            continue
        tool = existing or Tool(name=name)
        tool.description = _text(item, "description")
        tool.entrypoint = entrypoint
        tool.args_schema = item.get("args_schema") if "args_schema" in item else {}
        tool.side_effect = item.get("side_effect", False)
        tool.requires_approval = item.get("requires_approval", False)
        tool.approver_group = _group(item.get("approver_group"), result, f"Tool '{name}'")
        try:
            tool.full_clean()
        except ValidationError as exc:
            result.problems.append(f"Tool '{name}' not imported: {_error_text(exc)}")
            if existing:
                existing.refresh_from_db()
                tools[name] = existing
            continue
        tool.save()
        tools[name] = tool
        result.created.append(f"{'updated ' if existing else ''}tool '{name}'")
    return tools


def _agent_differs(agent: Agent, fields: dict, role: Role, tools: list[Tool]) -> bool:
    return (
        agent.role_id != role.pk
        or any(getattr(agent, k) != v for k, v in fields.items())
        or {t.pk for t in agent.tools.all()} != {t.pk for t in tools}
    )


def _import_agents(
    items: list, roles: dict[str, Role], tools: dict[str, Tool], trusted: bool, result: ImportResult
) -> dict[str, str]:
    """Create or update the agents; return {name in the file: name on this Baton}."""
    names: dict[str, str] = {}
    for item in _named_items(items, "Agent", result):
        name = item["name"]
        role_name = _text(item, "role")
        role = roles.get(role_name) or Role.objects.filter(name=role_name).first()
        if role is None:
            result.problems.append(
                f"Agent '{name}' not imported: its role '{role_name}' is neither in the file "
                "nor on this Baton."
            )
            continue
        agent_tools = []
        tool_names = item.get("tools") or []
        if not isinstance(tool_names, list):
            tool_names = [tool_names]
        for tool_name in tool_names:
            tool = tools.get(str(tool_name)) or Tool.objects.filter(name=str(tool_name)).first()
            if tool is None:
                result.problems.append(
                    f"Agent '{name}': tool '{tool_name}' is not available; the agent was "
                    "imported without it."
                )
            else:
                agent_tools.append(tool)
        fields = {key: item[key] for key in AGENT_FIELDS if key in item and item[key] is not None}
        existing = Agent.objects.filter(name=name).first()
        if existing:
            probe = Agent(name=name, role=role, **{k: getattr(existing, k) for k in AGENT_FIELDS})
            for key, value in fields.items():
                setattr(probe, key, value)
            try:
                probe.clean_fields(exclude=["name", "role"])
            except ValidationError as exc:
                result.problems.append(f"Agent '{name}' not imported: {_error_text(exc)}")
                continue
            clean = {k: getattr(probe, k) for k in AGENT_FIELDS}
            if not _agent_differs(existing, clean, role, agent_tools):
                names[name] = existing.name
                continue
        if existing and trusted:
            agent = existing
        else:
            agent = Agent(name=unique_name(Agent, name) if existing else name)
        agent.role = role
        for key, value in fields.items():
            setattr(agent, key, value)
        try:
            agent.full_clean()
        except ValidationError as exc:
            result.problems.append(f"Agent '{name}' not imported: {_error_text(exc)}")
            continue
        agent.save()
        agent.tools.set(agent_tools)
        names[name] = agent.name
        if agent is existing:
            result.created.append(f"updated agent '{name}'")
        else:
            result.created.append(f"agent '{agent.name}'")
            if agent.name != name:
                result.problems.append(
                    f"A different agent named '{name}' exists; imported as '{agent.name}'."
                )
    return names


def _import_workflow(
    data: dict, spec: dict, owner, replace: bool, result: ImportResult
) -> Workflow:
    name = _text(data, "name").strip() or _text(data, "slug") or "Imported workflow"
    slug = _text(data, "slug").strip() or slugify(name)
    try:
        validate_slug(slug)
    except ValidationError:
        raise ImportFailed(f"The workflow slug '{slug}' is not a valid slug.") from None
    existing = Workflow.objects.filter(slug=slug).first()
    if existing and replace:
        if owner is not None and not (
            Workflow.objects.for_user(owner).filter(pk=existing.pk).exists()
        ):
            raise ImportFailed(f"You may not replace workflow '{slug}'.")
        workflow = existing
        result.created.append(f"updated workflow '{slug}'")
    else:
        if existing:
            new_slug = unique_name(Workflow, slug, "slug")
            result.problems.append(
                f"A workflow with the slug '{slug}' exists; imported as '{new_slug}'."
            )
            slug = new_slug
        workflow = Workflow(slug=slug, owner=owner)
        result.created.append(f"workflow '{slug}'")
    workflow.name = name[:200]
    workflow.description = _text(data, "description")
    layout = data.get("layout") or {}
    if not isinstance(layout, dict):
        result.problems.append("`workflow.layout` is not a mapping; the layout was not imported.")
        layout = {}
    workflow.layout = layout
    workflow.draft = spec

    budgets = data.get("budgets") or {}
    if not isinstance(budgets, dict):
        result.problems.append("`workflow.budgets` is not a mapping; default budgets apply.")
        budgets = {}
    for key in BUDGET_FIELDS:
        if key not in budgets:
            continue
        model_field = Workflow._meta.get_field(key)
        try:
            value = model_field.clean(budgets[key], workflow)
        except ValidationError as exc:
            result.problems.append(f"Budget {key} not imported: {' '.join(exc.messages)}")
            continue
        setattr(workflow, key, value)
    if "approver_group" in data:
        workflow.approver_group = _group(data["approver_group"], result, "The workflow")
    workflow.save()
    return workflow
