"""`manage.py run_workflow <slug> --input '<json>' [--wait]`: start a run from the shell."""

import json
import sys
import time

from django.core.management.base import BaseCommand

from runs import engine
from runs.models import Run, Step
from teams.models import Workflow


class Command(BaseCommand):
    help = "Start a run of a workflow's latest published version; --wait follows it to the end."

    def add_arguments(self, parser):
        parser.add_argument("slug")
        parser.add_argument("--input", default="{}", help="The run's input as a JSON object.")
        parser.add_argument("--wait", action="store_true", help="Print steps until the run ends.")
        parser.add_argument("--timeout", type=float, default=600.0)

    def handle(self, slug, input, wait, timeout, **options):
        try:
            data = json.loads(input)
        except (ValueError, RecursionError) as exc:
            return self._fail(f"--input is not valid JSON: {exc}")
        workflow = Workflow.objects.filter(slug=slug).first()
        if workflow is None:
            return self._fail(f"no workflow with slug {slug!r}")
        version = workflow.latest_version()
        if version is None:
            return self._fail(f"workflow {slug!r} has no published version")
        try:
            run = engine.start_run(version, data, None)
        except engine.RunInputError as exc:
            return self._fail("invalid input: " + "; ".join(exc.messages))
        self.stdout.write(f"run {run.pk} started: /runs/{run.pk}/")
        if not wait:
            return
        run = self._follow(run, timeout)
        self.stdout.write(
            f"run {run.pk} {run.status}: {run.total_tokens} tokens, ${run.cost:.6f}"
            + (f" — {run.error}" if run.error else "")
        )
        if run.status != Run.SUCCEEDED:
            sys.exit(1)

    def _follow(self, run: Run, timeout: float) -> Run:
        seen: set[int] = set()
        deadline = time.monotonic() + timeout
        while True:
            run.refresh_from_db()
            for step in run.steps.filter(status__in=Step.DONE).exclude(pk__in=seen):
                seen.add(step.pk)
                self.stdout.write(
                    f"  {step.node_id}#{step.iteration} {step.status} "
                    f"{step.total_tokens} tokens ${step.cost:.6f} {step.latency_ms} ms"
                    + (f" — {step.error}" if step.error else "")
                )
            if run.status in Run.TERMINAL:
                return run
            if run.status == Run.WAITING_APPROVAL:
                self.stdout.write(f"  waiting for approval: {run.blocked_on} (/approvals/)")
                while run.status == Run.WAITING_APPROVAL and time.monotonic() < deadline:
                    time.sleep(0.5)
                    run.refresh_from_db()
            if time.monotonic() > deadline:
                self.stderr.write(f"run {run.pk} still {run.status} after {timeout}s")
                sys.exit(1)
            time.sleep(0.1)

    def _fail(self, message: str):
        self.stderr.write(f"error: {message}")
        sys.exit(2)
