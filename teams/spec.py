"""The workflow spec: its format, its upgrades and its validator.

A spec is plain JSON::

    {
      "schema_version": 2,
      "entry": "research",                       # optional; the first node by default
      "input_schema": {...JSON schema...},
      "state_schema": {...JSON schema...},       # optional, documents the state keys
      "nodes": [{"id": "research", "kind": "agent", "agent": "Researcher",
                 "prompt": "Research {topic}", "output_schema": {...}}, ...],
      "edges": [{"source": "research", "target": "write"}, ...],
    }

Node kinds and their own keys (every node may also set `label` and `output_key`, the state key
its output is stored under, by default its id):

- agent: agent (name), prompt (template over state, `{key}` or `{key.sub}`), output_schema,
  tools_only (bool), escalate (bool, default true: a semantic failure asks a human)
- tool: tool (name), args (object; string values are templates)
- router: rules live on its outgoing edges (`condition`), one edge has `default: true`;
  with `agent` set, that agent classifies the state into one of the edges' `label`s
- parallel: every outgoing edge is a branch; branch_timeout_s (optional)
- join: on_branch_failure "fail" (default) or "continue"
- supervisor: agent (the supervisor), workers (agent names), max_turns, prompt
- vote: agents (>= 2), judge, mode "pick" or "synthesise", prompt
- debate: agents (>= 2), judge, max_rounds, summarise_after_tokens, prompt
- subworkflow: workflow (slug), version (optional number), input (object of templates)
- approval: title, prompt, due_in_s, default_outcome ("approve" or "reject")

Edges: source, target, optional `on` ("success" default, "failure", "rejected"), `condition`
({"path": "a.b", "op": "eq", "value": 1}), `default` (router fallback), `label`,
`max_iterations` (a loop's bound: the edge is followed at most that many times per run).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import jsonschema
import referencing.exceptions

SCHEMA_VERSION = 2

NODE_KINDS = (
    "agent",
    "tool",
    "router",
    "parallel",
    "join",
    "supervisor",
    "vote",
    "debate",
    "subworkflow",
    "approval",
)
EDGE_TRIGGERS = ("success", "failure", "rejected")
CONDITION_OPS = ("eq", "ne", "gt", "gte", "lt", "lte", "contains", "in", "exists", "truthy")
MAX_NODES = 1000


@dataclass(frozen=True)
class Problem:
    message: str
    node: str | None = None
    edge: int | None = None

    def __str__(self) -> str:
        if self.node:
            return f"node '{self.node}': {self.message}"
        if self.edge is not None:
            return f"edge {self.edge + 1}: {self.message}"
        return self.message

    def as_dict(self) -> dict:
        return {"message": self.message, "node": self.node, "edge": self.edge}


def empty_spec() -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "input_schema": {"type": "object", "properties": {}},
        "nodes": [],
        "edges": [],
    }


def upgrade_spec(spec: dict, from_version: int | None = None) -> dict:
    """Return `spec` in the current schema version, without changing the argument.

    Version 1 (Baton 0.0) named a node's kind `type` and an edge's ends `from`/`to`.
    """
    if not isinstance(spec, dict):
        return spec
    spec = copy.deepcopy(spec)
    version = from_version or spec.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        version = _guess_version(spec)
    if version < 2:
        for node in spec.get("nodes") if isinstance(spec.get("nodes"), list) else []:
            if isinstance(node, dict) and "type" in node and "kind" not in node:
                node["kind"] = node.pop("type")
        for edge in spec.get("edges") if isinstance(spec.get("edges"), list) else []:
            if isinstance(edge, dict):
                if "from" in edge and "source" not in edge:
                    edge["source"] = edge.pop("from")
                if "to" in edge and "target" not in edge:
                    edge["target"] = edge.pop("to")
    spec["schema_version"] = SCHEMA_VERSION
    return spec


def _guess_version(spec: dict) -> int:
    nodes = spec.get("nodes") if isinstance(spec.get("nodes"), list) else []
    edges = spec.get("edges") if isinstance(spec.get("edges"), list) else []
    if any(isinstance(n, dict) and "type" in n for n in nodes) or any(
        isinstance(e, dict) and "from" in e for e in edges
    ):
        return 1
    return SCHEMA_VERSION


def _nodes(spec) -> list[dict]:
    nodes = spec.get("nodes") if isinstance(spec, dict) else None
    return [n for n in nodes if isinstance(n, dict)] if isinstance(nodes, list) else []


def node_map(spec: dict) -> dict[str, dict]:
    return {n["id"]: n for n in _nodes(spec) if isinstance(n.get("id"), str)}


def entry_node(spec: dict) -> str | None:
    entry = spec.get("entry")
    if entry:
        return entry if isinstance(entry, str) else None
    nodes = _nodes(spec)
    return nodes[0].get("id") if nodes and isinstance(nodes[0].get("id"), str) else None


def agents_used(spec: dict) -> set[str]:
    names: set[str] = set()
    for node in _nodes(spec):
        for key in ("agent", "judge"):
            if isinstance(node.get(key), str) and node[key]:
                names.add(node[key])
        for key in ("agents", "workers"):
            values = node.get(key)
            if isinstance(values, list):
                names.update(a for a in values if isinstance(a, str))
    return names


def validate_spec(
    spec,
    known_agents: set[str] | None = None,
    known_tools: set[str] | None = None,
    known_workflows: set[str] | None = None,
) -> list[Problem]:
    """Every problem of a spec, each with the node or edge it belongs to. Pure: pass the names of
    the agents, tools and workflows that exist to also check references (None skips that check).
    """
    if not isinstance(spec, dict):
        return [Problem("The spec must be a JSON object.")]
    problems: list[Problem] = []
    nodes = spec.get("nodes")
    edges = spec.get("edges", [])
    if not isinstance(nodes, list) or not nodes:
        return [Problem("The spec needs a non-empty list of nodes.")]
    if len(nodes) > MAX_NODES:
        return [Problem(f"A workflow may have at most {MAX_NODES} nodes.")]
    if not isinstance(edges, list):
        return [Problem("`edges` must be a list.")]

    problems += _check_schema(spec.get("input_schema"), "input_schema", required=True)
    if spec.get("state_schema") is not None:
        problems += _check_schema(spec["state_schema"], "state_schema", required=False)

    ids: list[str] = []
    for index, node in enumerate(nodes):
        if not isinstance(node, dict) or not isinstance(node.get("id"), str) or not node["id"]:
            problems.append(Problem(f"node {index + 1} needs a text `id`."))
            continue
        if node["id"] in ids:
            problems.append(Problem("duplicate node id", node=node["id"]))
        ids.append(node["id"])
        problems += _check_node(node, known_agents, known_tools, known_workflows)
    by_id = node_map(spec)

    valid_edges: list[dict] = []
    for index, edge in enumerate(edges):
        if not isinstance(edge, dict):
            problems.append(Problem("must be an object with source and target", edge=index))
            continue
        ends_ok = True
        for end in ("source", "target"):
            if not isinstance(edge.get(end), str) or edge.get(end) not in by_id:
                problems.append(Problem(f"{end} {edge.get(end)!r} is not a node", edge=index))
                ends_ok = False
        if edge.get("on", "success") not in EDGE_TRIGGERS:
            problems.append(Problem(f"`on` must be one of {', '.join(EDGE_TRIGGERS)}", edge=index))
        if "condition" in edge and edge["condition"] is not None:
            problems += [Problem(m, edge=index) for m in _condition_problems(edge["condition"])]
        bound = edge.get("max_iterations")
        if bound is not None and (
            not isinstance(bound, int) or isinstance(bound, bool) or bound < 1
        ):
            problems.append(Problem("max_iterations must be a whole number >= 1", edge=index))
        if ends_ok:
            valid_edges.append(edge)

    entry = entry_node(spec)
    if not isinstance(entry, str) or entry not in by_id:
        problems.append(Problem(f"entry node {entry!r} does not exist"))
        return problems

    incoming: dict[str, list[dict]] = {nid: [] for nid in by_id}
    outgoing: dict[str, list[dict]] = {nid: [] for nid in by_id}
    for edge in valid_edges:
        outgoing[edge["source"]].append(edge)
        incoming[edge["target"]].append(edge)

    for nid, node in by_id.items():
        kind = node.get("kind")
        outs = [e for e in outgoing[nid] if e.get("on", "success") == "success"]
        if kind == "join" and len(incoming[nid]) < 2:
            problems.append(Problem("a join needs at least two inputs", node=nid))
        if kind == "router":
            if not any(e.get("default") for e in outs):
                problems.append(Problem("a router needs a default edge", node=nid))
            if len(outs) < 2:
                problems.append(Problem("a router needs at least two outgoing edges", node=nid))
            if node.get("agent") and any(not e.get("label") for e in outs):
                problems.append(
                    Problem("an LLM router needs a label on every outgoing edge", node=nid)
                )
        if kind == "parallel" and len(outs) < 2:
            problems.append(Problem("a parallel node needs at least two branches", node=nid))
        if kind != "router":
            for e in outs:
                if e.get("default"):
                    problems.append(Problem("only a router's edges can be default", node=nid))
                    break

    reachable = _reachable(entry, outgoing)
    for nid in by_id:
        if nid not in reachable:
            problems.append(Problem("unreachable from the entry node", node=nid))

    bounded = [e for e in valid_edges if not e.get("max_iterations")]
    cycle = _find_cycle(by_id, bounded)
    if cycle:
        path = " -> ".join(cycle)
        problems.append(
            Problem(
                f"cycle without a loop bound ({path}); set max_iterations on one of its edges",
                node=cycle[0],
            )
        )
    return problems


def _check_schema(schema, name: str, required: bool) -> list[Problem]:
    if schema is None:
        return [Problem(f"`{name}` is required (a JSON schema)")] if required else []
    if not isinstance(schema, dict):
        return [Problem(f"`{name}` must be a JSON schema object")]
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
        # Resolving the schema against a sample finds references to nowhere ($ref).
        jsonschema.Draft202012Validator(schema).is_valid({})
    except jsonschema.SchemaError as exc:
        return [Problem(f"`{name}` is not a valid JSON schema: {exc.message}")]
    except (referencing.exceptions.Unresolvable, RecursionError) as exc:
        return [Problem(f"`{name}` has a reference that cannot be resolved: {exc}"[:300])]
    return []


def _condition_problems(condition) -> list[str]:
    if not isinstance(condition, dict):
        return ["condition must be an object {path, op, value}"]
    problems = []
    if not isinstance(condition.get("path"), str) or not condition["path"]:
        problems.append("condition needs a `path` into the state")
    if condition.get("op", "eq") not in CONDITION_OPS:
        problems.append(f"condition op must be one of {', '.join(CONDITION_OPS)}")
    return problems


def _need_name(node: dict, key: str, known: set[str] | None, what: str) -> list[Problem]:
    value = node.get(key)
    if not isinstance(value, str) or not value.strip():
        return [Problem(f"missing {what} (`{key}`)", node=node["id"])]
    if known is not None and value not in known:
        return [Problem(f"unknown {what} {value!r}", node=node["id"])]
    return []


def _need_names(node: dict, key: str, known: set[str] | None, minimum: int) -> list[Problem]:
    values = node.get(key)
    if not isinstance(values, list) or len(values) < minimum:
        return [Problem(f"`{key}` needs at least {minimum} agent(s)", node=node["id"])]
    problems = []
    for value in values:
        if not isinstance(value, str) or (known is not None and value not in known):
            problems.append(Problem(f"unknown agent {value!r} in `{key}`", node=node["id"]))
    return problems


def _positive_int(node: dict, key: str) -> list[Problem]:
    value = node.get(key)
    if value is None:
        return []
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        return [Problem(f"`{key}` must be a whole number >= 1", node=node["id"])]
    return []


def _check_node(node, known_agents, known_tools, known_workflows) -> list[Problem]:
    kind = node.get("kind")
    nid = node["id"]
    if kind not in NODE_KINDS:
        return [Problem(f"unknown node kind {kind!r}", node=nid)]
    problems: list[Problem] = []
    if kind == "agent":
        problems += _need_name(node, "agent", known_agents, "agent")
        if node.get("output_schema") is not None:
            problems += [
                Problem(p.message.replace("`output_schema`", "output schema"), node=nid)
                for p in _check_schema(node["output_schema"], "output_schema", required=False)
            ]
    elif kind == "tool":
        problems += _need_name(node, "tool", known_tools, "tool")
        if not isinstance(node.get("args", {}), dict):
            problems.append(Problem("`args` must be an object", node=nid))
    elif kind == "router":
        if node.get("agent"):
            problems += _need_name(node, "agent", known_agents, "agent")
    elif kind == "join":
        if node.get("on_branch_failure", "fail") not in ("fail", "continue"):
            problems.append(Problem("on_branch_failure must be 'fail' or 'continue'", node=nid))
    elif kind == "parallel":
        problems += _positive_int(node, "branch_timeout_s")
    elif kind == "supervisor":
        problems += _need_name(node, "agent", known_agents, "supervisor agent")
        problems += _need_names(node, "workers", known_agents, 1)
        problems += _positive_int(node, "max_turns")
    elif kind in ("vote", "debate"):
        problems += _need_names(node, "agents", known_agents, 2)
        problems += _need_name(node, "judge", known_agents, "judge agent")
        if kind == "vote" and node.get("mode", "pick") not in ("pick", "synthesise"):
            problems.append(Problem("mode must be 'pick' or 'synthesise'", node=nid))
        problems += _positive_int(node, "max_rounds")
        problems += _positive_int(node, "summarise_after_tokens")
    elif kind == "subworkflow":
        problems += _need_name(node, "workflow", known_workflows, "workflow")
        if not isinstance(node.get("input", {}), dict):
            problems.append(Problem("`input` must be an object", node=nid))
    elif kind == "approval":
        if node.get("default_outcome", "reject") not in ("approve", "reject"):
            problems.append(Problem("default_outcome must be 'approve' or 'reject'", node=nid))
        problems += _positive_int(node, "due_in_s")
    return problems


def _reachable(entry: str, outgoing: dict[str, list[dict]]) -> set[str]:
    seen = {entry}
    stack = [entry]
    while stack:
        for edge in outgoing[stack.pop()]:
            if edge["target"] not in seen:
                seen.add(edge["target"])
                stack.append(edge["target"])
    return seen


def _find_cycle(by_id: dict, edges: list[dict]) -> list[str] | None:
    """A cycle in the graph of `edges` as a list of node ids, or None (iterative DFS)."""
    graph: dict[str, list[str]] = {nid: [] for nid in by_id}
    for edge in edges:
        graph[edge["source"]].append(edge["target"])
    state: dict[str, int] = {}
    for start in graph:
        if state.get(start):
            continue
        path = [start]
        state[start] = 1
        stack = [iter(graph[start])]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                state[path.pop()] = 2
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(graph[nxt]))
    return None
