"""The workflow editor in Chromium: build a workflow with the mouse, publish it, run it, watch it.

Node positions on the canvas come from the editor itself (`window.batonEditor`), so the tests
drive the real gestures (drag from the palette, drag an edge handle) at the right pixels.
"""

import json
import re
import statistics

import pytest
from playwright.sync_api import Page, expect

from runs.models import Run
from teams.models import Workflow
from teams.spec import empty_spec
from tests.factories import make_agent

pytestmark = [pytest.mark.browser]

TOPIC_SCHEMA = {
    "type": "object",
    "properties": {"topic": {"type": "string"}},
    "required": ["topic"],
}


@pytest.fixture
def page(live_server, alice, chromium):
    page = chromium.new_page(base_url=live_server.url, viewport={"width": 1440, "height": 900})
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto("/accounts/login/")
    page.fill("#id_username", "alice")
    page.fill("#id_password", "alice-pass-123")
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/runs/$"))
    yield page
    assert errors == [], f"JavaScript errors on the page: {errors}"


def open_editor(page: Page, slug: str) -> None:
    page.goto(f"/workflows/{slug}/edit/")
    expect(page.locator("#editor")).to_have_attribute("data-ready", "true")


def inspector_shows(page: Page, key: str | re.Pattern) -> None:
    """Wait until the side panel shows this element ("node:<id>", "edge:<id>", "workflow:")
    and htmx has wired up its form."""
    expect(page.locator("#panel-body")).to_have_attribute("data-key", key)


def saved(page: Page) -> None:
    """Wait until every change so far is recorded and saved."""
    page.wait_for_function("window.batonEditor.idle()", timeout=15_000)
    expect(page.locator("#save-status")).to_have_text("All changes saved")


def node_point(page: Page, node_id: str) -> dict:
    """The page coordinates of a node's centre."""
    return page.evaluate(
        """(id) => {
            const cy = window.batonEditor.graph.cy;
            const p = cy.getElementById(id).renderedPosition();
            const r = cy.container().getBoundingClientRect();
            return {x: r.left + p.x, y: r.top + p.y};
        }""",
        node_id,
    )


def run_js(page: Page, statement: str) -> None:
    """Run a statement with `cy` in scope. It returns nothing on purpose: Playwright would
    otherwise serialise the Cytoscape collection it evaluates to, the whole graph."""
    page.evaluate(f"() => {{ const cy = window.batonEditor.graph.cy; {statement}; }}")


def count(page: Page, selector: str) -> int:
    return page.evaluate("(s) => window.batonEditor.graph.cy.elements(s).length", selector)


def drop_node(page: Page, kind: str, x: int, y: int) -> None:
    page.drag_and_drop(
        f'.palette-item[data-kind="{kind}"]', "#canvas", target_position={"x": x, "y": y}
    )


def connect(page: Page, source: str, target: str) -> None:
    """Hover the source, grab the handle that appears on its right, drop it on the target."""
    edges = count(page, "edge")
    start = node_point(page, source)
    page.mouse.move(start["x"] - 30, start["y"] + 80)  # off any node first, as a hand would
    page.mouse.move(start["x"], start["y"], steps=4)
    handle = page.locator(".edge-handle")
    expect(handle).to_be_visible()
    box = handle.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    end = node_point(page, target)
    page.mouse.move(end["x"], end["y"], steps=12)
    page.mouse.up()
    page.wait_for_function(f"window.batonEditor.graph.cy.edges().length === {edges + 1}")


def node_spec(page: Page, node_id: str) -> dict:
    return page.evaluate("(id) => window.batonEditor.graph.nodeSpec(id)", node_id)


def test_build_a_three_node_workflow_publish_it_run_it_and_watch_it_succeed(
    page, celery_worker, alice
):
    for name in ("researcher", "writer", "editor"):
        make_agent(name)
    Workflow.objects.create(name="Report", slug="report", owner=alice, draft=empty_spec())
    open_editor(page, "report")

    # The run input, in the workflow settings the panel shows when nothing is selected.
    inspector_shows(page, "workflow:")
    page.fill("#panel-body textarea[name=input_schema]", json.dumps(TOPIC_SCHEMA))
    page.wait_for_function("window.batonEditor.graph.meta.input_schema.required?.[0] === 'topic'")

    # Three agent nodes dragged from the palette, each given its agent in the side panel.
    for index, agent in enumerate(("researcher", "writer", "editor")):
        node_id = f"agent_{index + 1}"
        drop_node(page, "agent", 150 + index * 260, 220 + (index % 2) * 60)
        inspector_shows(page, f"node:{node_id}")
        page.select_option("#panel-body select[name=agent]", agent)
        expect(page.locator("#agent-card")).to_contain_text("scripted/baton")
        page.get_by_role("button", name="{topic}").click()  # a state-variable chip
        page.wait_for_function(
            f"window.batonEditor.graph.nodeSpec('{node_id}').prompt === '{{topic}}'"
        )
        assert node_spec(page, node_id)["agent"] == agent
    assert count(page, "node") == 3

    connect(page, "agent_1", "agent_2")
    connect(page, "agent_2", "agent_3")
    saved(page)
    expect(page.locator("#problems-count")).to_have_text("0")

    page.fill("#publish-form input[name=note]", "first version")
    page.get_by_role("button", name="Publish").click()
    expect(page.locator("#editor-message")).to_have_text("Published version 1.")
    version = Workflow.objects.get(slug="report").latest_version()
    assert version.note == "first version" and version.created_by == alice
    assert [n["agent"] for n in version.spec["nodes"]] == ["researcher", "writer", "editor"]
    assert [(e["source"], e["target"]) for e in version.spec["edges"]] == [
        ("agent_1", "agent_2"),
        ("agent_2", "agent_3"),
    ]

    # Run the draft (identical to version 1, so no new version) and watch the nodes light up.
    page.get_by_role("tab", name="Run").click()
    page.fill("textarea[name=input-topic]", "honey bees")
    page.get_by_role("button", name="Start run").click()
    card = page.locator("[data-run-card]")
    expect(card.locator("[data-run-status]")).to_have_text("Succeeded", timeout=90_000)
    page.wait_for_function("window.batonEditor.graph.cy.nodes('.st-succeeded').length === 3")
    run = Run.objects.get()
    assert run.status == Run.SUCCEEDED and run.version == version
    assert run.input == {"topic": "honey bees"}
    assert Workflow.objects.get(slug="report").versions.count() == 1


def test_undo_redo_delete_and_autosave_survive_a_reload(page, alice):
    make_agent("researcher")
    Workflow.objects.create(name="Scratch", slug="scratch", owner=alice, draft=empty_spec())
    open_editor(page, "scratch")

    page.get_by_role("button", name=re.compile(r"^Router")).click()
    page.get_by_role("button", name=re.compile(r"^Approval")).click()
    assert count(page, "node") == 2
    page.locator("#canvas").click(position={"x": 5, "y": 5})  # leave the inspector's fields

    page.keyboard.press("Control+z")
    assert count(page, "node") == 1
    page.keyboard.press("Control+Shift+z")
    assert count(page, "node") == 2

    run_js(page, "cy.getElementById('approval_1').select()")
    page.keyboard.press("Delete")
    assert count(page, "node") == 1
    saved(page)

    # Layout is stored apart from the spec; the router's problems were reported on save.
    workflow = Workflow.objects.get(slug="scratch")
    assert [n["id"] for n in workflow.draft["nodes"]] == ["router_1"]
    assert set(workflow.layout) == {"router_1"}
    assert "x" not in workflow.draft["nodes"][0]
    expect(page.locator("#problems-count")).not_to_have_text("0")

    page.reload()
    expect(page.locator("#editor")).to_have_attribute("data-ready", "true")
    assert count(page, "node") == 1
    expect(page.get_by_role("button", name="Undo")).to_be_disabled()


def test_problems_are_badged_on_nodes_and_listed_and_publish_is_refused(page, alice):
    Workflow.objects.create(name="Broken", slug="broken", owner=alice, draft=empty_spec())
    open_editor(page, "broken")
    drop_node(page, "router", 300, 250)
    saved(page)

    expect(page.locator("#problems-count")).to_have_text("2")
    assert page.evaluate(
        "window.batonEditor.graph.cy.getElementById('router_1').data('badge')"
    ).startswith("data:image/svg+xml")
    page.get_by_role("tab", name=re.compile("Problems")).click()
    problem = page.get_by_role("button", name="node 'router_1': a router needs a default edge")
    expect(problem).to_be_visible()
    expect(page.get_by_role("button", name="Publish")).to_be_disabled()

    # Clicking a problem selects its node and opens it in the inspector.
    run_js(page, "cy.$(':selected').unselect()")
    problem.click()
    page.get_by_role("tab", name="Inspector").click()
    inspector_shows(page, "node:router_1")
    expect(page.locator("#panel-body h2.panel-title")).to_contain_text("router_1")


def test_an_edge_drawn_in_connect_mode_gets_its_condition_from_the_side_panel(page, alice):
    make_agent("researcher")
    spec = {
        **empty_spec(),
        "nodes": [
            {"id": "a", "kind": "agent", "agent": "researcher"},
            {"id": "b", "kind": "agent", "agent": "researcher"},
        ],
        "edges": [],
    }
    Workflow.objects.create(
        name="Edges",
        slug="edges",
        owner=alice,
        draft=spec,
        layout={"a": {"x": 0, "y": 0}, "b": {"x": 300, "y": 0}},
    )
    open_editor(page, "edges")

    # Connect mode: the whole node is the handle (for touchpads), dragging draws an edge.
    page.get_by_role("button", name="Connect mode").click()
    start, end = node_point(page, "a"), node_point(page, "b")
    page.mouse.move(start["x"], start["y"])
    page.mouse.down()
    page.mouse.move(end["x"], end["y"], steps=12)
    page.mouse.up()
    page.wait_for_function("window.batonEditor.graph.cy.edges().length === 1")
    assert node_point(page, "a") == start  # the node did not move
    page.get_by_role("button", name="Connect mode").click()

    # The new edge is selected: the inspector shows it.
    inspector_shows(page, re.compile(r"^edge:"))
    expect(page.locator("#panel-body h2.panel-title")).to_contain_text("a → b")
    page.fill("#panel-body input[name=condition_path]", "a.score")
    page.select_option("#panel-body select[name=condition_op]", "gte")
    page.fill("#panel-body input[name=condition_value]", "3")
    page.fill("#panel-body input[name=max_iterations]", "2")
    page.wait_for_function("window.batonEditor.graph.cy.edges()[0].data('spec').max_iterations")
    saved(page)
    label = page.evaluate("window.batonEditor.graph.cy.edges()[0].data('display')")
    assert label == "a.score gte 3 · loop max 2"  # what the canvas shows on the edge
    workflow = Workflow.objects.get(slug="edges")
    assert workflow.draft["edges"] == [
        {
            "source": "a",
            "target": "b",
            "condition": {"path": "a.score", "op": "gte", "value": 3},
            "max_iterations": 2,
        }
    ]


def test_three_hundred_nodes_stay_fluid(page, alice):
    """Frame times while panning and zooming a 300-node workflow, measured in Chromium."""
    make_agent("researcher")
    nodes = [
        {"id": f"n{i}", "kind": "agent", "agent": "researcher", "prompt": "{topic}"}
        for i in range(300)
    ]
    edges = [{"source": f"n{i}", "target": f"n{i + 1}"} for i in range(299)]
    edges += [{"source": f"n{i}", "target": f"n{i + 7}"} for i in range(0, 290, 10)]
    Workflow.objects.create(
        name="Big", slug="big", owner=alice, draft={**empty_spec(), "nodes": nodes, "edges": edges}
    )
    open_editor(page, "big")
    assert count(page, "node") == 300
    frames = page.evaluate("""async () => {
        const cy = window.batonEditor.graph.cy;
        cy.zoom(0.6);
        const times = [];
        let last = performance.now();
        for (let i = 0; i < 90; i++) {
            await new Promise((resolve) => requestAnimationFrame(resolve));
            const now = performance.now();
            times.push(now - last);
            last = now;
            cy.panBy({x: i % 30 < 15 ? -25 : 25, y: 6});
            if (i % 10 === 0) cy.zoom({level: cy.zoom() * (i % 20 ? 0.9 : 1.1),
                                       renderedPosition: {x: 400, y: 300}});
        }
        return times.slice(5);
    }""")
    median = statistics.median(frames)
    p95 = sorted(frames)[int(len(frames) * 0.95)]
    print(f"300 nodes: median frame {median:.1f} ms, p95 {p95:.1f} ms")
    # Fluid means a steady frame rate; the bound leaves room for a busy shared CI machine.
    assert median < 50, frames
    assert p95 < 120, frames


def test_renaming_a_node_keeps_its_edges_place_and_entry_role(page, alice):
    make_agent("researcher")
    spec = {
        **empty_spec(),
        "nodes": [
            {"id": "a", "kind": "agent", "agent": "researcher"},
            {"id": "b", "kind": "agent", "agent": "researcher"},
        ],
        "edges": [{"source": "a", "target": "b"}],
    }
    Workflow.objects.create(
        name="Names",
        slug="names",
        owner=alice,
        draft=spec,
        layout={"a": {"x": 0, "y": 0}, "b": {"x": 300, "y": 0}},
    )
    open_editor(page, "names")
    run_js(page, "cy.getElementById('a').select()")
    inspector_shows(page, "node:a")
    page.fill("#panel-body input[name=id]", "start")
    page.wait_for_function("window.batonEditor.graph.nodeSpec('start') !== null")
    saved(page)
    workflow = Workflow.objects.get(slug="names")
    assert [n["id"] for n in workflow.draft["nodes"]] == ["start", "b"]  # still the entry
    assert workflow.draft["edges"] == [{"source": "start", "target": "b"}]
    assert workflow.layout["start"] == {"x": 0, "y": 0}

    # Auto-layout moves nodes (layout only: the spec is untouched), and undo puts them back.
    page.get_by_role("button", name="Auto-layout").click()
    saved(page)
    workflow.refresh_from_db()
    assert workflow.layout["b"]["x"] > workflow.layout["start"]["x"]
    assert workflow.draft["edges"] == [{"source": "start", "target": "b"}]
    page.get_by_role("button", name="Fit").click()
    page.locator("#canvas").click(position={"x": 5, "y": 5})
    page.keyboard.press("Control+z")
    saved(page)
    workflow.refresh_from_db()
    assert workflow.layout == {"start": {"x": 0, "y": 0}, "b": {"x": 300, "y": 0}}
