"""WebSocket origin and authentication checks of the ASGI application.

Browsers send cookies with a cross-site WebSocket handshake, so a page on another site could
open a socket as the logged-in user: AllowedHostsOriginValidator must refuse any Origin that is
not one of ALLOWED_HOSTS. The test settings allow every host ("*"), so the application is built
here as production builds it, from orchestrator_site/asgi.py, with ALLOWED_HOSTS set.
"""

import runpy

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.test import Client

from runs.models import Run
from tests.factories import make_agent, make_workflow, pipeline_spec

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT = 5
HOST = "baton.example.com"


@pytest.fixture
def production_application(settings):
    settings.ALLOWED_HOSTS = [HOST]
    return runpy.run_module("orchestrator_site.asgi")["application"]


@pytest.fixture
def alices_run(alice):
    make_agent("writer")
    workflow = make_workflow(pipeline_spec("writer"), owner=alice, slug="origin")
    return Run.objects.create(
        workflow=workflow, version=workflow.latest_version(), started_by=alice
    )


def headers(user, origin: str | None) -> list[tuple[bytes, bytes]]:
    result = [(b"host", HOST.encode())]
    if origin is not None:
        result.append((b"origin", origin.encode()))
    if user is not None:
        client = Client()
        client.force_login(user)
        cookie = f"{django_settings.SESSION_COOKIE_NAME}={client.cookies['sessionid'].value}"
        result.append((b"cookie", cookie.encode()))
    return result


def connects(application, path: str, user, origin: str | None) -> bool:
    async def attempt() -> bool:
        communicator = WebsocketCommunicator(application, path, headers=headers(user, origin))
        connected, _ = await communicator.connect(TIMEOUT)
        if connected:
            await communicator.disconnect()
        else:  # the refusing consumer keeps waiting for messages: stop it now
            await communicator.wait(0.1)
        return connected

    return async_to_sync(attempt)()


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "https://baton.example.com.evil.example",
        "https://evilbaton.example.com",
        "null",
        None,
    ],
)
@pytest.mark.parametrize(
    "path", ["/ws/runs/", "/ws/runs/{run}/", "/ws/approvals/", "/ws/approvals/badge/"]
)
def test_a_socket_from_a_foreign_origin_is_refused(
    production_application, alice, alices_run, path, origin
):
    path = path.format(run=alices_run.pk)
    assert not connects(production_application, path, alice, origin)


@pytest.mark.parametrize(
    "path", ["/ws/runs/", "/ws/runs/{run}/", "/ws/approvals/", "/ws/approvals/badge/"]
)
def test_a_socket_from_baton_itself_is_accepted_for_a_logged_in_user(
    production_application, alice, alices_run, path
):
    """The refusals above are the origin check's: the same request from Baton's own origin
    connects, and without a session it does not."""
    path = path.format(run=alices_run.pk)
    assert connects(production_application, path, alice, f"https://{HOST}")
    assert not connects(production_application, path, None, f"https://{HOST}")


def test_the_origin_check_wraps_every_socket_route():
    from channels.security.websocket import OriginValidator

    from orchestrator_site.asgi import application

    assert isinstance(application.application_mapping["websocket"], OriginValidator)
