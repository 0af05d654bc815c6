"""Baton's ASGI application plus static files, for the browser test's Daphne process (Daphne
itself serves no static files, and the page needs htmx and the inbox script)."""

from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

from orchestrator_site.asgi import application as baton_application

application = ASGIStaticFilesHandler(baton_application)
