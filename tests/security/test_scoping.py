"""Every view and every socket is scoped: charlie, an outsider, gets 404 or 403 for each of
alice's objects and never sees them in lists, filters or live updates; alice reaches each of
them, so the refusals are not an artefact of wrong sample values.

Routes are found by walking the URL resolver, so a page added later is covered (and fails
here until it names a sample value for a new kind of URL parameter).
"""

import re
from dataclasses import dataclass

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth.models import Permission
from django.db import transaction
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, reverse

from approvals.models import ApprovalRequest
from orchestrator_site.asgi import application
from runs import events
from runs.models import Run, RunEvent
from teams.gallery import TEMPLATES
from tests.security.payloads import build_world

# Text only alice's workflow, run and approvals carry: any page of charlie's showing it leaks.
MARKER = "alice-secret-7f3a9"
# URL parameters that name one of alice's objects; the others pick a sample (gallery key,
# control action).
OBJECT_PARAMS = {"slug", "pk", "step_pk", "number", "run_id"}
UNSAFE = ("post", "put", "patch", "delete")
TIMEOUT = 5


@dataclass(frozen=True)
class Route:
    name: str
    params: tuple[str, ...]

    @property
    def namespace(self) -> str:
        return self.name.split(":")[0] if ":" in self.name else ""


def app_routes() -> list[Route]:
    """Every named route outside the admin (the admin has its own test below)."""
    found: list[Route] = []

    def walk(patterns, namespace: str) -> None:
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                if pattern.app_name == "admin":
                    continue
                ns = f"{namespace}{pattern.namespace}:" if pattern.namespace else namespace
                walk(pattern.url_patterns, ns)
            elif isinstance(pattern, URLPattern) and pattern.name:
                found.append(Route(namespace + pattern.name, _params(pattern)))

    walk(get_resolver().url_patterns, "")
    return found


def _params(pattern: URLPattern) -> tuple[str, ...]:
    converters = getattr(pattern.pattern, "converters", None)
    if converters:
        return tuple(converters)
    return tuple(pattern.pattern.regex.groupindex)


def route_params(kind: str) -> list:
    routes = [r for r in app_routes() if r.name not in ("login", "logout")]
    chosen = [r for r in routes if bool(OBJECT_PARAMS & set(r.params)) == (kind == "object")]
    return [pytest.param(r, id=r.name) for r in chosen]


def scoped_world(alice, bob):
    """Alice's workflow (bob is a member) with MARKER in everything that belongs to it."""
    alice.user_permissions.add(Permission.objects.get(codename="decide_approvalrequest"))
    return build_world(alice, MARKER, members=[bob], slug="alice-flow", shared="shared")


@pytest.fixture
def world(alice, bob):
    return scoped_world(alice, bob)


@pytest.fixture(autouse=True)
def _events_sent():
    """Events are published from a background thread: let it finish before the database goes."""
    yield
    events.flush()


def url_for(route: Route, world) -> str:
    values = {
        "slug": world.workflow.slug,
        "step_pk": world.agent_step.pk,
        "number": world.version.number,
        "run_id": world.run.pk,
        "key": next(iter(TEMPLATES)),
        "action": "cancel",
        "pk": world.pending.pk if route.namespace == "approvals" else world.run.pk,
    }
    missing = [p for p in route.params if p not in values]
    assert not missing, f"{route.name}: add a sample value for URL parameter(s) {missing}"
    return reverse(route.name, kwargs={p: values[p] for p in route.params})


def logged_in(user, **kwargs) -> Client:
    client = Client(**kwargs)
    client.force_login(user)
    return client


def _request(client: Client, method: str, url: str):
    """One request whose writes are undone, so every route sees the same objects."""
    with transaction.atomic():
        response = getattr(client, method)(url)
        transaction.set_rollback(True)
    return response


# --- HTTP ---------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("route", route_params("object"))
def test_an_outsider_gets_404_or_403_for_every_object_url(world, charlie, route):
    url = url_for(route, world)
    client = logged_in(charlie)
    statuses = {method: _request(client, method, url).status_code for method in ("get", *UNSAFE)}
    assert set(statuses.values()) <= {403, 404, 405}, f"{url}: {statuses}"
    assert {403, 404} & set(statuses.values()), f"{url}: no method answers 403/404"


@pytest.mark.django_db
@pytest.mark.parametrize("route", route_params("object"))
def test_the_owner_reaches_every_object_url(world, alice, route):
    url = url_for(route, world)
    client = logged_in(alice)
    statuses = {method: _request(client, method, url).status_code for method in ("get", *UNSAFE)}
    allowed = {m: s for m, s in statuses.items() if s != 405}
    assert allowed, f"{url} answers no method"
    assert not {403, 404} & set(allowed.values()), f"{url}: {statuses}"


@pytest.mark.django_db
@pytest.mark.parametrize("route", route_params("plain"))
def test_pages_without_an_object_show_an_outsider_nothing_of_alice(world, charlie, route):
    url = url_for(route, world)
    response = _request(logged_in(charlie), "get", url)
    # Staff-only pages (the audit log) refuse outsiders outright.
    assert response.status_code in (200, 302, 403, 405), f"{url}: {response.status_code}"
    assert MARKER not in response.content.decode(errors="replace")


@pytest.mark.django_db
def test_the_member_sees_what_the_outsider_does_not(world, bob):
    """The lists do show alice's work to her team: the marker check above can fail."""
    client = logged_in(bob)
    for url in ("/runs/", "/workflows/", "/approvals/", "/costs/"):
        assert MARKER in client.get(url).content.decode(), url


@pytest.mark.django_db
@pytest.mark.parametrize(
    "url",
    [
        "/runs/?workflow=alice-flow",
        "/runs/?q=alice-flow",
        "/runs/?q={run}",
        "/runs/new/?workflow=alice-flow",
        "/costs/?workflow=alice-flow",
        "/costs/?workflow=alice-flow&format=csv&table=by_workflow",
        "/costs/?user=alice&format=csv&table=by_user",
        "/costs/?format=csv&table=top_runs",
        "/approvals/?run={run}",
        "/approvals/?workflow=alice-flow",
    ],
)
def test_filters_naming_alices_objects_show_an_outsider_nothing(world, charlie, url):
    response = logged_in(charlie).get(url.format(run=world.run.pk))
    assert response.status_code in (200, 400, 404)
    assert MARKER not in response.content.decode(errors="replace")


@pytest.mark.django_db
def test_an_outsider_cannot_decide_alices_approvals_in_bulk(world, charlie):
    charlie.user_permissions.add(Permission.objects.get(codename="decide_approvalrequest"))
    response = logged_in(charlie).post(
        "/approvals/bulk/",
        {
            "ids": [world.pending.pk, world.tool_approval.pk],
            "decision": "approve",
        },
    )
    assert response.status_code in (200, 302)
    assert set(
        ApprovalRequest.objects.filter(
            pk__in=[world.pending.pk, world.tool_approval.pk]
        ).values_list("status", flat=True)
    ) == {ApprovalRequest.PENDING}


@pytest.mark.django_db
def test_only_staff_may_stop_everything(world, alice, admin_user):
    assert logged_in(alice).post("/runs/stop-everything/", {"on": "1"}).status_code == 403
    assert logged_in(admin_user).post("/runs/stop-everything/", {"on": "1"}).status_code == 302


def _admin_paths() -> list[str]:
    paths = []

    def walk(patterns, prefix: str) -> None:
        for pattern in patterns:
            route = str(pattern.pattern).lstrip("^").rstrip("$").replace("\\", "")
            route = re.sub(r"<(?:\w+:)?\w+>", "1", route)
            route = re.sub(r"\(\?P<\w+>([\w|]+)\)", lambda m: m[1].split("|")[0], route)
            route = re.sub(r"\(\?P<\w+>[^)]*\)", "1", route)
            if isinstance(pattern, URLResolver):
                walk(pattern.url_patterns, prefix + route)
            else:
                paths.append("/" + prefix + route)

    for pattern in get_resolver().url_patterns:
        if isinstance(pattern, URLResolver) and pattern.app_name == "admin":
            walk(pattern.url_patterns, "admin/")
    return paths


@pytest.mark.django_db
def test_the_admin_is_for_staff_only(world, alice):
    client = logged_in(alice)
    paths = _admin_paths()
    assert "/admin/teams/workflow/1/change/" in paths
    for path in paths:
        if path in ("/admin/login/", "/admin/logout/"):
            continue
        response = client.get(path)
        assert response.status_code in (302, 404), path
        if response.status_code == 302:
            assert response["Location"].startswith("/admin/login/"), path


# --- sockets ------------------------------------------------------------------------------


def socket(path: str, user=None, origin: bytes = b"http://localhost") -> WebsocketCommunicator:
    headers = [(b"origin", origin)]
    if user is not None:
        client = logged_in(user)
        session = client.cookies[settings.SESSION_COOKIE_NAME].value
        headers.append((b"cookie", f"{settings.SESSION_COOKIE_NAME}={session}".encode()))
    return WebsocketCommunicator(application, path, headers=headers)


async def connects(communicator: WebsocketCommunicator) -> bool:
    connected, _ = await communicator.connect(TIMEOUT)
    if not connected:  # the refusing consumer keeps waiting for messages: stop it now
        await communicator.wait(0.1)
    return connected


@pytest.mark.django_db(transaction=True)
def test_an_outsider_and_an_anonymous_visitor_cannot_open_alices_run_socket(world, charlie, alice):
    path = f"/ws/runs/{world.run.pk}/"

    async def scenario():
        for user in (charlie, None):
            assert not await connects(socket(path, user)), user
        owner = socket(path, alice)
        assert await connects(owner)
        await owner.disconnect()

    async_to_sync(scenario)()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", ["/ws/runs/", "/ws/approvals/", "/ws/approvals/badge/"])
def test_anonymous_visitors_cannot_open_the_shared_sockets(world, path):
    async def scenario():
        assert not await connects(socket(path))

    async_to_sync(scenario)()


@pytest.mark.django_db(transaction=True)
def test_the_runs_list_socket_forwards_alices_events_to_her_team_only(world, alice, charlie):
    async def scenario():
        outsider, owner = socket("/ws/runs/", charlie), socket("/ws/runs/", alice)
        assert await connects(outsider) and await connects(owner)
        await database_sync_to_async(events.append_event)(
            world.run.pk, "run.totals", {"tokens": 300, "cost": "0.01"}
        )
        assert MARKER in await owner.receive_from(TIMEOUT)
        assert await outsider.receive_nothing(1.0)
        await database_sync_to_async(_new_run_of)(world)
        assert MARKER in await owner.receive_from(TIMEOUT)
        assert await outsider.receive_nothing(1.0)
        await owner.disconnect()
        await outsider.disconnect()

    async_to_sync(scenario)()


def _new_run_of(world) -> None:
    run = Run.objects.create(
        workflow=world.workflow,
        version=world.version,
        input={"topic": MARKER},
        started_by=world.workflow.owner,
    )
    events.append_event(run.pk, "run.created", {"status": run.status})


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", ["/ws/approvals/", "/ws/approvals/badge/"])
def test_the_approvals_sockets_tell_an_outsider_nothing_of_alices_requests(
    world, alice, charlie, path
):
    async def scenario():
        outsider, owner = socket(path, charlie), socket(path, alice)
        assert await connects(outsider) and await connects(owner)
        await database_sync_to_async(_open_request)(world)
        assert "approvals-badge" in await owner.receive_from(TIMEOUT)
        assert await outsider.receive_nothing(1.0)
        await owner.disconnect()
        await outsider.disconnect()

    async_to_sync(scenario)()


def _open_request(world) -> None:
    from runs import hooks

    with transaction.atomic():
        hooks.request_approval(
            run=world.run,
            step=world.waiting_step,
            kind="escalation",
            title=MARKER,
            payload={"output": MARKER},
            context={},
            tool_call=None,
            due_in_s=None,
            default_outcome="reject",
            approver_group=None,
        )


@pytest.mark.django_db(transaction=True)
def test_an_approvals_socket_filtered_on_alices_run_is_refused_to_an_outsider(world, charlie):
    async def scenario():
        assert not await connects(socket(f"/ws/approvals/?run={world.run.pk}", charlie))
        assert not await connects(socket("/ws/approvals/?workflow=alice-flow", charlie))

    async_to_sync(scenario)()


@pytest.mark.django_db(transaction=True)
def test_a_socket_message_from_the_page_changes_nothing(world, alice):
    """Sockets are listen-only: decisions and controls go through views (CSRF, permissions)."""
    before = RunEvent.objects.count(), list(ApprovalRequest.objects.values_list("status"))

    async def scenario():
        for path in (f"/ws/runs/{world.run.pk}/", "/ws/runs/", "/ws/approvals/"):
            communicator = socket(path, alice)
            assert await connects(communicator)
            for text in (
                '{"last_seq": "x"}',
                '{"action": "approve", "id": 1}',
                "[[[" * 400,
                '{"last_seq": 99999999999999999999999}',
                "null",
                "\x00",
            ):
                await communicator.send_to(text_data=text)
            await communicator.receive_nothing(0.5)
            await communicator.disconnect()

    async_to_sync(scenario)()
    assert (RunEvent.objects.count(), list(ApprovalRequest.objects.values_list("status"))) == before


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("hello", ["[" * 1200, "not json", '{"last_seq": [1]}', "[]"])
def test_a_malformed_hello_on_the_run_socket_replays_from_the_start(world, alice, hello):
    async def scenario():
        communicator = socket(f"/ws/runs/{world.run.pk}/", alice)
        assert await connects(communicator)
        await communicator.send_to(text_data=hello)
        assert 'data-seq="1"' in await communicator.receive_from(TIMEOUT)
        await communicator.disconnect()

    async_to_sync(scenario)()
