"""The four fault scenarios of `make chaos` and the audit that judges every run they start.

Each scenario starts runs of one workflow (a planner, then three parallel branches: a researcher,
a publisher agent that calls the side-effect tool `publish_report`, and a tool node that calls it
directly; a join; an editor), injects its fault while they run, waits for every run to end
(or its deadline), then audits each run from the database:

- lost: a run still active at the deadline, a node that never ran, a side effect missing;
- wrong: a terminal state the fault does not explain (a failure without a correct reason);
- duplicates: more side-effect rows than intended calls (publish_report writes one
  teams.OutboxMessage per call under its idempotency key);
- half-written: totals that disagree with the LLM call records, a step left pending or running
  in a finished run, a gap in the run's event log (RunEvent seqs must be 1..N).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from django.contrib.auth import get_user_model
from django.db import connection
from django.db.models import Sum

from bench.chaos.stack import Stack
from runs import engine
from runs.models import Run, RunEvent, Step, ToolCall, UsageRecord
from teams.models import Agent, OutboxMessage, Role, Tool, Workflow, WorkflowVersion
from tests.fake_llm import FakeLLMServer

WORKFLOW_SLUG = "chaos-fan-out"
EXPECTED_NODES = {"plan", "fan", "research", "publish", "notify", "join", "summary"}
SIDE_EFFECTS_PER_RUN = 2  # the publisher agent's one tool call + the notify tool node
LLM_CALLS_PER_RUN = 5  # plan, research, publish (asks for the tool, then answers), summary
# Every event a live message carries has its line in the activity log (one message may carry
# several consecutive events; the seq marker only names the last).
_SEQ = re.compile(r'<li id="ev-(\d+)"')


@dataclass
class Row:
    scenario: str
    runs: int = 0
    succeeded: int = 0
    failed_explained: int = 0
    wrong: int = 0
    lost: int = 0
    duplicates: int = 0
    half_written: int = 0
    rerun: int = 0  # steps that ran more than once (a crash, a dropped connection, a retry)
    swept: int = 0  # doorbells the sweeper rang again (lost messages, expired leases)
    faults: str = ""
    duration_s: float = 0.0
    skipped: str = ""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.skipped) or not (
            self.wrong or self.lost or self.duplicates or self.half_written
        )

    def problem(self, category: str, message: str) -> None:
        setattr(self, category, getattr(self, category) + 1)
        self.problems.append(" ".join(message.split()))


@dataclass
class Settings:
    """What the scenarios may vary (the command's flags)."""

    seed: int
    deadline_s: float
    llm_timeout_s: int
    hang_s: float


class Chaos:
    """Shared state of one chaos run: the stack, the fake LLM, the workflow, the user."""

    def __init__(self, stack: Stack, fake: FakeLLMServer, options: Settings):
        self.stack = stack
        self.fake = fake
        self.options = options
        self.rng = random.Random(options.seed)
        self.user = get_user_model().objects.create_superuser(
            "chaos", "chaos@example.com", "chaos-not-a-login"
        )
        self.version = self._workflow()

    # --- the workflow ---

    def _workflow(self) -> WorkflowVersion:
        publish = Tool.objects.create(
            name="publish_report",
            entrypoint="baton.publish_report",
            side_effect=True,
            description="Publish a report to the team's outbox.",
            args_schema={
                "type": "object",
                "properties": {"title": {"type": "string"}, "body": {"type": "string"}},
                "required": ["title", "body"],
            },
        )
        for name, tools in (
            ("planner", []),
            ("researcher", []),
            ("publisher", [publish]),
            ("editor", []),
        ):
            role = Role.objects.create(name=f"chaos {name}", goal=f"Act as the {name}")
            agent = Agent.objects.create(
                name=name,
                role=role,
                model=self.fake.model(),
                api_base=self.fake.base_url,
                timeout_s=self.options.llm_timeout_s,
                max_retries=3,
                max_tokens=256,
            )
            agent.tools.set(tools)
        spec = {
            "input_schema": {
                "type": "object",
                "properties": {"topic": {"type": "string"}},
                "required": ["topic"],
            },
            "nodes": [
                {
                    "id": "plan",
                    "kind": "agent",
                    "agent": "planner",
                    "prompt": "Plan a short report on {topic}",
                },
                {"id": "fan", "kind": "parallel"},
                {
                    "id": "research",
                    "kind": "agent",
                    "agent": "researcher",
                    "prompt": "Research {topic}",
                },
                {
                    "id": "publish",
                    "kind": "agent",
                    "agent": "publisher",
                    "prompt": "Publish a report on {topic}",
                },
                {
                    "id": "notify",
                    "kind": "tool",
                    "tool": "publish_report",
                    "args": {"title": "Notice: {topic}", "body": "{plan}"},
                },
                {"id": "join", "kind": "join"},
                {
                    "id": "summary",
                    "kind": "agent",
                    "agent": "editor",
                    "prompt": "Summarise the findings about {topic}:\n{research}",
                },
            ],
            "edges": [
                {"source": "plan", "target": "fan"},
                {"source": "fan", "target": "research"},
                {"source": "fan", "target": "publish"},
                {"source": "fan", "target": "notify"},
                {"source": "research", "target": "join"},
                {"source": "publish", "target": "join"},
                {"source": "notify", "target": "join"},
                {"source": "join", "target": "summary"},
            ],
        }
        workflow = Workflow.objects.create(
            name="Chaos fan-out", slug=WORKFLOW_SLUG, owner=self.user, draft=spec
        )
        return workflow.publish(user=self.user, note="chaos")

    # --- helpers ---

    def start_runs(self, count: int, tag: str) -> list[int]:
        return [
            engine.start_run(self.version, {"topic": f"{tag} {i}"}, self.user).pk
            for i in range(count)
        ]

    def wait(self, run_ids: list[int], started: float) -> bool:
        """Poll until every run is terminal or the scenario's deadline; True if all ended."""
        deadline = started + self.options.deadline_s
        while time.monotonic() < deadline:
            active = Run.objects.filter(pk__in=run_ids).exclude(status__in=Run.TERMINAL)
            if not active.exists():
                return True
            time.sleep(0.5)
        return False

    def busy(self, run_ids: list[int]) -> bool:
        return Step.objects.filter(run_id__in=run_ids, status=Step.RUNNING).exists()

    def begin(self) -> tuple[float, datetime]:
        return time.monotonic(), datetime.now()

    def finish(self, row: Row, clock: tuple[float, datetime]) -> None:
        """Close a scenario's clock; note what the sweeper did and what crashed meanwhile."""
        started, wall = clock
        row.duration_s = time.monotonic() - started
        row.swept = self.stack.sweeps_between(wall, datetime.now())["requeued"]
        crashes = self.stack.crashes_since(started)
        if crashes:
            row.faults += f"; {len(crashes)} crashed processes restarted"
            row.notes.append(
                "crashed on their own and restarted by the supervisor: " + ", ".join(crashes)
            )

    def ensure_workers(self, timeout_s: float = 120.0) -> None:
        """Wait until every worker is up again (the supervisor restarts crashed ones)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(w.alive and w.ready for w in self.stack.workers):
                return
            time.sleep(0.2)
        raise TimeoutError(f"workers not back within {timeout_s:.0f}s; see {self.stack.var_dir}")

    # --- the audit ---

    def audit(self, row: Row, run_ids: list[int], explained=None) -> None:
        """Judge every run. `explained(run)` says whether a failure is the one the fault
        explains; without it, every run must succeed."""
        row.runs = len(run_ids)
        for run in Run.objects.filter(pk__in=run_ids).order_by("pk"):
            self._audit_run(row, run, explained)
        row.rerun += Step.objects.filter(run_id__in=run_ids, attempt__gt=1).count()

    def _audit_run(self, row: Row, run: Run, explained) -> None:
        name = f"run {run.pk}"
        steps = list(run.steps.all())
        if run.status not in Run.TERMINAL:
            busy = ", ".join(f"{s.node_id}={s.status}" for s in steps if s.status not in Step.DONE)
            row.problem("lost", f"{name} still {run.status} at the deadline ({busy})")
            return
        outbox = list(
            OutboxMessage.objects.filter(idempotency_key__startswith=f"run{run.pk}-").values_list(
                "idempotency_key", flat=True
            )
        )
        calls = {
            c.idempotency_key: c
            for c in ToolCall.objects.filter(step__run=run, tool="publish_report")
        }
        if run.status == Run.SUCCEEDED:
            row.succeeded += 1
            ran = {s.node_id for s in steps if s.status == Step.SUCCEEDED}
            if EXPECTED_NODES - ran:
                row.problem("lost", f"{name} succeeded without {sorted(EXPECTED_NODES - ran)}")
            unfinished = [f"{s.node_id}={s.status}" for s in steps if s.status != Step.SUCCEEDED]
            if unfinished:
                row.problem("half_written", f"{name} succeeded with steps {unfinished}")
            usage = UsageRecord.objects.filter(run=run).count()
            if usage != LLM_CALLS_PER_RUN:
                row.problem(
                    "half_written",
                    f"{name}: {usage} LLM calls recorded, expected {LLM_CALLS_PER_RUN}",
                )
            if len(outbox) < SIDE_EFFECTS_PER_RUN:
                row.problem(
                    "lost", f"{name}: {len(outbox)} side effects, expected {SIDE_EFFECTS_PER_RUN}"
                )
        else:
            if explained is not None and explained(run):
                row.failed_explained += 1
                row.notes.append(f"{run.status}: {_reason(run.error)}")
            else:
                row.problem("wrong", f"{name} ended {run.status}: {run.error[:300]}")
            leftover = [
                f"{s.node_id}={s.status}" for s in steps if s.status in (Step.PENDING, Step.RUNNING)
            ]
            if leftover:
                row.problem("half_written", f"{name} ended with steps {leftover}")
        if len(outbox) > SIDE_EFFECTS_PER_RUN:
            row.problem(
                "duplicates",
                f"{name}: {len(outbox)} side effects for {SIDE_EFFECTS_PER_RUN} intended calls",
            )
        strays = [key for key in outbox if key not in calls]
        if strays:
            row.problem("duplicates", f"{name}: side effects with no recorded call: {strays}")
        unsent = [k for k, c in calls.items() if c.status == ToolCall.SUCCEEDED and k not in outbox]
        if unsent:
            row.problem("lost", f"{name}: calls recorded as done but never sent: {unsent}")
        self._audit_records(row, run, name)

    def _audit_records(self, row: Row, run: Run, name: str) -> None:
        seqs = list(RunEvent.objects.filter(run=run).order_by("seq").values_list("seq", flat=True))
        if seqs != list(range(1, run.last_seq + 1)):
            missing = sorted(set(range(1, run.last_seq + 1)) - set(seqs))
            row.problem(
                "half_written", f"{name}: event log not 1..{run.last_seq}; missing {missing[:10]}"
            )
        totals = UsageRecord.objects.filter(run=run).aggregate(t=Sum("total_tokens"), c=Sum("cost"))
        if (totals["t"] or 0) != run.total_tokens or (totals["c"] or 0) != run.cost:
            row.problem(
                "half_written",
                f"{name}: totals {run.total_tokens} tokens / "
                f"${run.cost} but calls add up to {totals['t']} / "
                f"${totals['c']}",
            )
        for step in run.steps.all():
            step_tokens = (
                UsageRecord.objects.filter(step=step).aggregate(t=Sum("total_tokens"))["t"] or 0
            )
            if step_tokens != step.total_tokens:
                row.problem(
                    "half_written",
                    f"{name}/{step.node_id}: {step.total_tokens} "
                    f"tokens on the step, {step_tokens} in its calls",
                )
        if run.reserved_tokens or run.reserved_cost:
            # Not a loss (the chaos workflow has no budget), but it would eat a budgeted run's
            # headroom: an LLM call that died mid-flight never released its estimate.
            row.notes.append(
                "runs ended with a budget reservation of a call that died mid-flight still held"
            )


def _reason(error: str) -> str:
    """A failure reason without its run-specific parts, to group them."""
    return re.sub(r"\b\d+\b", "N", error.split("\n")[0])[:140]


# --- a. worker SIGKILLs ----------------------------------------------------------------------


def worker_kills(chaos: Chaos, runs: int, kills: int) -> Row:
    """SIGKILL a random worker at a random moment while steps run; restart it a moment later
    (in the background, so the next kill may come while it boots: then no worker is up)."""
    row = Row("a. worker SIGKILL + restart")
    clock = chaos.begin()
    run_ids = chaos.start_runs(runs, "kills")
    stop = threading.Event()
    restarts: list[threading.Thread] = []

    def restart(victim) -> None:
        stop.wait(chaos.rng.uniform(0.2, 2.0))
        try:
            victim.start()
        except (RuntimeError, TimeoutError):
            pass  # it did not come up: the supervisor starts it again

    def monkey() -> None:
        try:
            while len(restarts) < kills and not stop.is_set():
                if stop.wait(chaos.rng.uniform(0.5, 3.0)):
                    break
                alive = [w for w in chaos.stack.workers if w.alive and w.ready and not w.held]
                if not alive or not chaos.busy(run_ids):
                    continue  # a kill between steps proves little; wait for work in flight
                victim = chaos.rng.choice(alive)
                victim.kill()
                thread = threading.Thread(target=restart, args=(victim,), daemon=True)
                thread.start()
                restarts.append(thread)
        finally:
            connection.close()  # this thread's own

    thread = threading.Thread(target=monkey, name="chaos-monkey", daemon=True)
    thread.start()
    chaos.wait(run_ids, clock[0])
    stop.set()
    thread.join()
    for restarting in restarts:
        restarting.join()
    chaos.ensure_workers()
    row.faults = f"{len(restarts)} SIGKILLs"
    chaos.finish(row, clock)
    chaos.audit(row, run_ids)
    return row


# --- b. Redis stopped and restarted ---------------------------------------------------------


class RunPage:
    """An open run page: the real RunConsumer on the real channel layer. When its socket
    breaks it reconnects and sends the last seq it applied, as the page's script does; it
    records every seq it is sent, in order."""

    def __init__(self, run_id: int, user):
        self.run_id = run_id
        self.user = user
        self.seqs: list[int] = []
        self.reconnects = 0
        self.errors: list[str] = []
        self.finished = False

    @property
    def last(self) -> int:
        return self.seqs[-1] if self.seqs else 0

    async def watch(self, give_up: threading.Event) -> None:
        from channels.db import database_sync_to_async
        from channels.routing import URLRouter
        from channels.testing import WebsocketCommunicator

        from runs.routing import websocket_urlpatterns

        @database_sync_to_async
        def run_done() -> bool:
            run = Run.objects.get(pk=self.run_id)
            return run.status in Run.TERMINAL and self.last >= run.last_seq

        app = URLRouter(websocket_urlpatterns)
        while not give_up.is_set():
            page = WebsocketCommunicator(app, f"/ws/runs/{self.run_id}/")
            page.scope["user"] = self.user
            try:
                connected, _ = await page.connect(timeout=5)
                if not connected:
                    raise ConnectionError("the consumer refused the socket")
                await page.send_to(text_data=json.dumps({"last_seq": self.last}))
                while not give_up.is_set():
                    html = await _next_frame(page, timeout=1.0)
                    if html is None:
                        if await run_done():
                            self.finished = True
                            return
                        continue
                    self.seqs.extend(map(int, _SEQ.findall(html)))
            except Exception as exc:  # a broken socket: the page reconnects after a pause
                self.reconnects += 1
                self.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                await asyncio.sleep(0.5)
            finally:
                try:
                    await page.disconnect()
                except Exception:
                    pass


class Dashboard(threading.Thread):
    """Run pages served by one event loop, as one Daphne process serves its sockets."""

    def __init__(self, pages: list[RunPage]):
        super().__init__(name="chaos-dashboard", daemon=True)
        self.pages = pages
        self.give_up = threading.Event()

    def run(self) -> None:
        async def watch_all() -> None:
            await asyncio.gather(*(page.watch(self.give_up) for page in self.pages))

        asyncio.run(watch_all())

    def finish(self, timeout_s: float) -> None:
        """Give the pages `timeout_s` to see their runs' last events, then close them."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not all(p.finished for p in self.pages):
            time.sleep(0.2)
        self.give_up.set()
        self.join(timeout=10)


async def _next_frame(page, timeout: float) -> str | None:
    """The next text frame, None after `timeout` quiet seconds; raises if the consumer died.

    (WebsocketCommunicator.receive_from would cancel the consumer on a timeout.)"""
    get = asyncio.ensure_future(page.output_queue.get())
    done, _ = await asyncio.wait(
        {get, page.future}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
    )
    if get in done:
        message = get.result()
        if message["type"] == "websocket.close":
            raise ConnectionError("the consumer closed the socket")
        return message.get("text") or ""
    get.cancel()
    if page.future.done():
        page.future.result()
        raise ConnectionError("the consumer stopped")
    return None


def redis_restart(chaos: Chaos, runs: int, down_s: float, watched: int = 2) -> Row:
    """Kill Redis while runs are in flight (it keeps nothing on disk: every queued and
    unacked message is lost), bring it back after `down_s`, and watch two run pages."""
    row = Row("b. Redis stopped + restarted")
    clock = chaos.begin()
    started = clock[0]
    run_ids = chaos.start_runs(runs, "redis")
    dashboard = Dashboard([RunPage(run_id, chaos.user) for run_id in run_ids[:watched]])
    dashboard.start()
    # Stop it once the runs are well under way: some finished steps, many in flight.
    until = time.monotonic() + 20
    while (
        time.monotonic() < until
        and Step.objects.filter(run_id__in=run_ids, status=Step.SUCCEEDED).count() < runs
    ):
        time.sleep(0.1)
    in_flight = Step.objects.filter(
        run_id__in=run_ids, status__in=(Step.PENDING, Step.RUNNING)
    ).count()
    chaos.stack.stop_redis()
    time.sleep(down_s)
    chaos.stack.restart_redis()
    all_ended = chaos.wait(run_ids, started)
    dashboard.finish(timeout_s=30 if all_ended else 1)
    row.faults = f"down {down_s:g}s with {in_flight} steps queued or running"
    chaos.finish(row, clock)
    chaos.audit(row, run_ids)
    for watcher in dashboard.pages:
        last_seq = Run.objects.values_list("last_seq", flat=True).get(pk=watcher.run_id)
        if watcher.seqs != list(range(1, last_seq + 1)):
            row.problem(
                "half_written",
                f"dashboard of run {watcher.run_id} got "
                f"{len(watcher.seqs)} events (not 1..{last_seq} in "
                f"order); reconnects {watcher.reconnects}",
            )
        else:
            row.notes.append(
                f"dashboard of run {watcher.run_id}: all {last_seq} events in "
                f"order after {watcher.reconnects} reconnect(s)"
            )
        if watcher.errors:
            kinds = Counter(error.split(":")[0] for error in watcher.errors)
            row.notes.append(
                f"dashboard of run {watcher.run_id}: sockets broke with "
                + ", ".join(f"{n} x {k}" for k, n in kinds.most_common())
            )
    return row


# --- c. a flaky LLM -------------------------------------------------------------------------


def flaky_llm(chaos: Chaos, runs: int, rate: float) -> Row:
    """The fake LLM fails `rate` of all calls: 429, 500, a hang past the agent's timeout,
    a malformed body. A run must succeed, or fail because one call kept failing past its
    retries, saying so."""
    row = Row(f"c. LLM failing {rate:.0%} of calls")
    fake = chaos.fake
    before = fake.request_count
    mix = [
        {"status": 429, "message": "Rate limit reached (chaos)"},
        {"status": 500, "message": "Internal server error (chaos)"},
        {"hang": chaos.options.hang_s},
        {"malformed": True},
    ]
    fake.set_fault_rate(rate, seed=chaos.options.seed, mix=mix)
    clock = chaos.begin()
    started = clock[0]
    try:
        run_ids = chaos.start_runs(runs, "flaky")
        chaos.wait(run_ids, started)
    finally:
        fake.set_fault_rate(0.0)
    requests = fake.request_count - before
    answered = UsageRecord.objects.filter(run_id__in=run_ids).count()
    row.faults = f"{requests - answered} of {requests} calls failed"
    chaos.finish(row, clock)

    def explained(run: Run) -> bool:
        failed = run.steps.filter(status=Step.FAILED).first()
        return (
            run.status == Run.FAILED
            and failed is not None
            and failed.error_kind == "transient"
            and "gave up after" in failed.error
            and failed.error in run.error
            and len(failed.attempts) >= (failed.agent.max_retries + 1 if failed.agent else 1)
        )

    chaos.audit(row, run_ids, explained)
    return row


# --- d. database connections dropped --------------------------------------------------------


def db_drops(chaos: Chaos, runs: int, drops: int) -> Row:
    """pg_terminate_backend every connection the workers hold, at random moments while steps
    run: the interrupted steps must run again and nothing may be half-written."""
    row = Row("d. DB connections dropped")
    if not chaos.stack.database.is_postgres:
        row.skipped = "needs PostgreSQL (set DATABASE_URL); SQLite has no server connections"
        return row
    clock = chaos.begin()
    started = clock[0]
    run_ids = chaos.start_runs(runs, "db")
    stop = threading.Event()
    done: list[int] = []

    def terminator() -> None:
        try:
            while len(done) < drops and not stop.is_set():
                if stop.wait(chaos.rng.uniform(0.5, 2.5)):
                    break
                if chaos.busy(run_ids):
                    done.append(chaos.stack.database.terminate_worker_connections())
        finally:
            connection.close()  # this thread's own

    thread = threading.Thread(target=terminator, name="chaos-db", daemon=True)
    thread.start()
    chaos.wait(run_ids, started)
    stop.set()
    thread.join()
    row.faults = f"{len(done)} drops, {sum(done)} connections killed"
    chaos.finish(row, clock)
    chaos.audit(row, run_ids)
    return row
