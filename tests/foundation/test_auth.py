"""Every page but login needs a logged-in user; login, logout and the shared layout work."""

import json
import re
from urllib.parse import urlsplit

import pytest
from django.conf import settings
from django.contrib import messages
from django.contrib.messages.storage.cookie import CookieStorage
from django.contrib.staticfiles import finders
from django.template.loader import render_to_string
from django.urls import URLPattern, URLResolver, get_resolver, resolve
from django.urls.exceptions import Resolver404

from approvals.models import ApprovalRequest
from runs.models import Run
from tests.factories import make_agent, make_workflow, pipeline_spec

pytestmark = pytest.mark.django_db

# The only pages an anonymous visitor may open.
PUBLIC_URL_NAMES = {"login", "admin:login"}
LOGIN_PAGES = {settings.LOGIN_URL, "/admin/login/"}

_CONVERTER_SAMPLES = {
    "int": "1",
    "str": "x",
    "slug": "x",
    "path": "1",
    "uuid": "9b2f4e0c-3c49-4d7e-9a55-1c1f0f5e8d2a",
}


def _sample_route(route: str) -> str:
    """`runs/<int:pk>/` -> `runs/1/`."""
    return re.sub(r"<(?:(\w+):)?\w+>", lambda m: _CONVERTER_SAMPLES.get(m[1] or "str", "x"), route)


def _sample_regex(regex: str) -> str:
    """`^(?P<app_label>teams|runs)/$` -> `teams/`, `^r/(?P<id>\\d+)/$` -> `r/1/`."""

    def group(match: re.Match) -> str:
        body = match[1]
        if re.fullmatch(r"[\w|]+", body):
            return body.split("|")[0]
        return "1" if body.startswith(r"\d") else "x"

    path = re.sub(r"\(\?P<\w+>((?:[^()]|\([^()]*\))*)\)", group, regex)
    return path.removeprefix("^").removesuffix("$").replace("\\", "")


def every_url() -> list[tuple[str, str]]:
    """(path, name) of every HTTP route, with sample values for its parameters; routes added
    by later issues are covered automatically."""
    found = []

    def walk(patterns, prefix: str, namespace: str) -> None:
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                ns = f"{namespace}{pattern.namespace}:" if pattern.namespace else namespace
                walk(pattern.url_patterns, prefix + _part(pattern), ns)
            elif isinstance(pattern, URLPattern):
                found.append(("/" + prefix + _part(pattern), f"{namespace}{pattern.name or ''}"))

    walk(get_resolver().url_patterns, "", "")
    return found


def _part(pattern) -> str:
    text = str(pattern.pattern)
    if pattern.pattern.__class__.__name__ == "RegexPattern":
        return _sample_regex(text)
    return _sample_route(text)


def protected_urls():
    params = []
    for path, name in every_url():
        if name in PUBLIC_URL_NAMES:
            continue
        try:
            resolve(path)
        except Resolver404:
            continue  # a sample value the route's regex refuses; covered by its siblings
        params.append(pytest.param(path, id=path))
    return params


def test_the_url_walk_finds_the_main_pages():
    paths = {path for path, _ in every_url()}
    assert {"/", "/accounts/logout/", "/admin/", "/admin/teams/workflow/"} <= paths
    assert "/admin/teams/workflow/1/change/" in paths


@pytest.mark.parametrize("path", protected_urls())
@pytest.mark.parametrize("method", ["get", "post"])
def test_anonymous_visitors_are_sent_to_log_in(client, path, method):
    response = getattr(client, method)(path)

    assert response.status_code == 302, f"{method.upper()} {path} is open to anonymous users"
    location = urlsplit(response["Location"])
    assert location.path in LOGIN_PAGES
    assert "next=" in location.query


@pytest.mark.parametrize(
    "path",
    [
        "/runs/",
        "/workflows/",
        "/approvals/",
        "/costs/",
        "/runs/1/",
        "/workflows/x/edit/",
        "/no-such-page/",
    ],
)
def test_main_sections_need_a_login_whether_or_not_their_pages_exist_yet(client, path):
    """Anonymous users learn nothing: a page that exists sends them to log in, one that does
    not is a plain 404."""
    try:
        resolve(path)
    except Resolver404:
        assert client.get(path).status_code == 404
    else:
        response = client.get(path)
        assert response.status_code == 302
        assert urlsplit(response["Location"]).path == settings.LOGIN_URL


def test_the_login_page_is_open_and_in_batons_look(client):
    response = client.get("/accounts/login/")
    assert response.status_code == 200
    assert "registration/login.html" in [t.name for t in response.templates]
    content = response.content.decode()
    assert "css/baton.css" in content
    assert "Log in to Baton" in content
    assert 'name="csrfmiddlewaretoken"' in content
    assert 'name="username"' in content and 'name="password"' in content


def test_logging_in_opens_the_app(client, alice):
    response = client.post("/accounts/login/", {"username": "alice", "password": "alice-pass-123"})
    assert response.status_code == 302
    assert response["Location"] == settings.LOGIN_REDIRECT_URL
    assert client.session["_auth_user_id"] == str(alice.pk)


def test_logging_in_returns_to_the_page_asked_for(client, alice):
    response = client.get("/workflows/")
    login_url = response["Location"]
    response = client.post(
        login_url, {"username": "alice", "password": "alice-pass-123", "next": "/workflows/"}
    )
    assert response["Location"] == "/workflows/"


def test_logging_in_never_redirects_to_another_site(client, alice):
    response = client.post(
        "/accounts/login/",
        {"username": "alice", "password": "alice-pass-123", "next": "https://evil.example/"},
    )
    assert response["Location"] == settings.LOGIN_REDIRECT_URL


def test_a_wrong_password_is_refused_with_a_message(client, alice):
    response = client.post("/accounts/login/", {"username": "alice", "password": "nope"})
    assert response.status_code == 200
    assert "_auth_user_id" not in client.session
    assert "Please enter a correct username and password" in response.content.decode()


def test_logging_out_ends_the_session(client, alice):
    client.force_login(alice)
    response = client.post("/accounts/logout/")
    assert response.status_code == 302
    assert response["Location"] == settings.LOGOUT_REDIRECT_URL
    assert "_auth_user_id" not in client.session
    assert urlsplit(client.get("/").url).path == settings.LOGIN_URL


def test_logout_is_post_only_so_a_link_cannot_log_you_out(client, alice):
    client.force_login(alice)
    assert client.get("/accounts/logout/").status_code == 405
    assert client.session["_auth_user_id"] == str(alice.pk)


# --- the shared layout ----------------------------------------------------------------------


def render_base(rf, user, path: str = "/runs/") -> str:
    request = rf.get(path)
    request.user = user
    return render_to_string("base.html", request=request)


def test_the_navigation_links_every_section_and_logs_out_by_post(rf, alice):
    html = render_base(rf, alice, "/workflows/")
    for href in ("/workflows/", "/runs/", "/approvals/", "/costs/"):
        assert f'href="{href}"' in html
    assert '<a href="/workflows/" aria-current="page">' in html
    assert 'href="/admin/"' not in html, "only staff see the admin link"
    assert "alice" in html
    logout_form = re.search(
        r'<form method="post" action="/accounts/logout/">(.*?)</form>', html, re.S
    )
    assert logout_form and 'name="csrfmiddlewaretoken"' in logout_form[1]


def test_staff_see_the_admin_link(rf, admin_user):
    assert 'href="/admin/"' in render_base(rf, admin_user)


def test_the_approvals_badge_counts_the_users_pending_requests(rf, alice, charlie):
    make_agent("writer")
    workflow = make_workflow(pipeline_spec("writer"), owner=alice)
    run = Run.objects.create(workflow=workflow, version=workflow.latest_version())
    ApprovalRequest.objects.create(run=run, kind="node", title="Ship it?")
    ApprovalRequest.objects.create(run=run, kind="node", title="And this?")
    ApprovalRequest.objects.create(run=run, kind="node", title="Done", status="approved")

    badge = re.compile(r'<span id="approvals-badge" class="(badge[^"]*)"[^>]*>(\d+)</span>')
    assert badge.search(render_base(rf, alice)).groups() == ("badge", "2")
    assert badge.search(render_base(rf, charlie)).groups() == ("badge badge-empty", "0")


def test_the_approvals_badge_renders_alone_for_live_updates():
    html = render_to_string("base.html#approvals-badge", {"pending_approvals": 3, "oob": True})
    assert html.startswith('<span id="approvals-badge"')
    assert 'hx-swap-oob="true"' in html
    assert ">3</span>" in html


def test_pages_load_htmx_2_and_its_websocket_extension_locally(rf, alice):
    html = render_base(rf, alice)
    scripts = re.findall(r'<script src="/static/([^"]+)"', html)
    assert "django_htmx/htmx-2.min.js" in scripts
    assert "django_htmx/ext/hx-ws-2.min.js" in scripts
    assert all(finders.find(script) for script in scripts)
    assert finders.find("css/baton.css")
    assert not re.search(r'(?:src|href)="(?:https?:)?//', html), "nothing from the internet"


def test_htmx_requests_carry_the_csrf_token(rf, alice):
    html = render_base(rf, alice)
    headers = re.search(r"<body hx-headers='([^']+)'>", html)
    assert json.loads(headers[1])["X-CSRFToken"]


def test_messages_are_shown_escaped(rf, alice):
    request = rf.get("/runs/")
    request.user = alice
    request._messages = CookieStorage(request)
    messages.success(request, "Run <b>42</b> started")
    messages.error(request, "Budget exceeded")

    html = render_to_string("base.html", request=request)

    assert (
        '<div class="message message-success" role="status">Run &lt;b&gt;42&lt;/b&gt; '
        "started</div>" in html
    )
    assert '<div class="message message-error" role="alert">Budget exceeded</div>' in html
