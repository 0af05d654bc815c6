"""HTML fragments for live updates (owned by the dashboard; see runs/events.py)."""

from django.utils.html import escape

DASHBOARD_KINDS = {"run.created", "run.status", "run.totals"}


def render_event(event) -> str:
    return f'<div id="event-{event.seq}">{escape(event.kind)}</div>'


def render_dashboard_row(event) -> str:
    return ""


def render_stream(step_id: int, text: str) -> str:
    return f'<pre id="stream-{step_id}">{escape(text)}</pre>'
