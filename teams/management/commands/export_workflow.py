"""Export a workflow, with its roles, agents and tool references, as one YAML file."""

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from teams.models import Workflow
from teams.yaml_io import export_workflow


class Command(BaseCommand):
    help = "Print a workflow as Baton YAML (or write it to a file with -o)."

    def add_arguments(self, parser):
        parser.add_argument("slug")
        parser.add_argument("-o", "--output", metavar="FILE", help="Write here, not to stdout.")

    def handle(self, *args, slug: str, output: str | None, **options):
        workflow = Workflow.objects.filter(slug=slug).first()
        if workflow is None:
            raise CommandError(f"No workflow with the slug {slug!r}.", returncode=2)
        text = export_workflow(workflow)
        if not output:
            self.stdout.write(text, ending="")
            return
        try:
            Path(output).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"Cannot write {output}: {exc.strerror}", returncode=2) from None
        self.stderr.write(f"Wrote {workflow.slug} to {output}.")
