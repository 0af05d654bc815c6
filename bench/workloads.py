"""The workloads of issue 9, run in the bench process against the stack's real workers.

Times come from the database where they can: a run's wall time is its `finished_at` (stamped by
the worker that finished it) minus the moment this process called `start_run`, on the same
clock, so how often this process polls never changes a figure, only when the next run starts.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.db.models import Count, Max, Q
from django.test import Client
from django.utils import timezone

from runs import engine, events
from runs.models import Run, RunEvent, Step, UsageRecord
from teams.models import Agent, Role, Workflow, WorkflowVersion

TOPIC = {"topic": "durable agents"}
MODEL = "openai/gpt-4o-mini"
FANOUT = 10
EVENT_LINE = re.compile(r'<li id="ev-(\d+)"')  # every event a live message carries


class BenchError(Exception):
    """A workload could not produce a figure (runs failed, a server did not answer)."""


class GroupListener:
    """Listens on a Channels group (by default the dashboard's: every run's status and
    totals) through the channel layer, from a thread and event loop of its own, and stamps
    each message's arrival. It counts as a watcher of the group (runs/events.py `watch`), as
    an open page does: the publishers render nothing for a group nobody watches.

    Since events are published by a background thread of each worker, a run can be finished
    while its events are still queued for rendering; `wait_published` waits for them, so one
    phase's backlog never lands in the next phase's figures, and says how long it took.
    """

    def __init__(self, group: str | None = None):
        self.group = group or events.DASHBOARD_GROUP
        self.arrivals: dict[int, dict[int, float]] = {}
        self.order: list[int] = []  # seqs in arrival order (meaningful for one run's group)
        self.errors = 0
        self._ready = threading.Event()
        self._stopping = False
        self._channel = ""
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._listen()), name="dashboard-listener", daemon=True
        )

    def start(self) -> GroupListener:
        self._thread.start()
        if not self._ready.wait(30):
            raise BenchError("the dashboard listener could not join its group")
        return self

    def stop(self) -> None:
        from asgiref.sync import async_to_sync
        from channels.layers import get_channel_layer

        self._stopping = True
        async_to_sync(get_channel_layer().send)(self._channel, {"type": "bench.stop"})
        self._thread.join(timeout=10)
        events.unwatch(self.group, self._channel)

    def out_of_order(self) -> int:
        """Messages that arrived after a later seq of the same group had arrived."""
        late, highest = 0, 0
        for seq in self.order:
            if seq < highest:
                late += 1
            highest = max(highest, seq)
        return late

    async def _listen(self) -> None:
        from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers

        # An instance of our own: channels_redis lets only one event loop receive() on a
        # layer instance, and this process may run several listeners.
        layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
        self._channel = await layer.new_channel()
        await layer.group_add(self.group, self._channel)
        refresher = asyncio.create_task(self._keep_watching())
        await asyncio.to_thread(events.watch, self.group, self._channel)
        self._ready.set()
        while not self._stopping:
            try:
                message = await layer.receive(self._channel)
            except Exception:  # a Redis hiccup: just listen again
                self.errors += 1
                if self.errors > 1000:
                    raise
                await asyncio.sleep(0.01)
                continue
            now = time.time()
            if message.get("type") == "run.events":  # a run's group: consecutive seqs
                seqs = range(message["first_seq"], message["last_seq"] + 1)
            elif message.get("type") == "run.row":  # the dashboard: the row after these
                seqs = message["seqs"]
            else:
                continue
            for seq in seqs:
                self.arrivals.setdefault(message["run_id"], {}).setdefault(seq, now)
                self.order.append(seq)
        refresher.cancel()

    async def _keep_watching(self) -> None:
        """A bench outlives a watcher entry: renew it as a consumer does."""
        while True:
            await asyncio.sleep(events.WATCH_REFRESH_S)
            await asyncio.to_thread(events.watch, self.group, self._channel)

    def wait_published(
        self, run_ids: list[int], timeout_s: float = 600, quiet_s: float = 10
    ) -> dict:
        """Until every dashboard event of these runs has arrived, or none has for `quiet_s`
        (a publish that failed is never retried: the event stays in the log only). Returns
        each arrived event's latency (arrival - created_at, ms), how many never arrived, and
        the drain: last arrival - the last run's finished_at (s)."""
        from runs import fragments

        expected = list(
            RunEvent.objects.filter(
                run_id__in=run_ids, kind__in=fragments.DASHBOARD_KINDS
            ).values_list("run_id", "seq", "created_at")
        )

        def missing() -> int:
            return sum(seq not in self.arrivals.get(run_id, {}) for run_id, seq, _ in expected)

        deadline = time.monotonic() + timeout_s
        last_missing, quiet_since = missing(), time.monotonic()
        while last_missing:
            time.sleep(0.02)
            now, left = time.monotonic(), missing()
            if left != last_missing:
                last_missing, quiet_since = left, now
            elif now - quiet_since > quiet_s or now > deadline:
                break
        arrived = [
            (run_id, seq, created_at)
            for run_id, seq, created_at in expected
            if seq in self.arrivals.get(run_id, {})
        ]
        latency = [
            (self.arrivals[run_id][seq] - created_at.timestamp()) * 1000
            for run_id, seq, created_at in arrived
        ]
        finished = Run.objects.filter(pk__in=run_ids).aggregate(last=Max("finished_at"))["last"]
        last_arrival = max(
            (self.arrivals[run_id][seq] for run_id, seq, _ in arrived), default=time.time()
        )
        return {
            "latency_ms": latency,
            "never_arrived": last_missing,
            "drain_s": max(last_arrival - finished.timestamp(), 0) if finished else 0.0,
        }


@dataclass
class Design:
    owner: object
    admin: object
    pipeline: WorkflowVersion
    fanout: WorkflowVersion


def make_design(llm_base_url: str) -> Design:
    """The users, agents and workflows every workload uses: agents talk to the fake server."""
    User = get_user_model()
    owner = User.objects.create_user("bench-owner", "bench-owner@example.com")
    admin = User.objects.create_superuser("bench-admin", "bench-admin@example.com", None)
    role = Role.objects.create(name="Bench agent", goal="Answer briefly and precisely")
    for name in ["step1", "step2", "step3", *(f"branch{i}" for i in range(1, FANOUT + 1))]:
        Agent.objects.create(name=f"bench-{name}", role=role, model=MODEL, api_base=llm_base_url)
    topic_schema = {
        "type": "object",
        "properties": {"topic": {"type": "string"}},
        "required": ["topic"],
    }
    pipeline = {
        "input_schema": topic_schema,
        "nodes": [
            {
                "id": f"step{i}",
                "kind": "agent",
                "agent": f"bench-step{i}",
                "prompt": f"Step {i}: work on {{topic}}",
            }
            for i in (1, 2, 3)
        ],
        "edges": [{"source": "step1", "target": "step2"}, {"source": "step2", "target": "step3"}],
    }
    branches = [f"branch{i}" for i in range(1, FANOUT + 1)]
    fanout = {
        "input_schema": topic_schema,
        "nodes": [
            {"id": "fan", "kind": "parallel"},
            *(
                {
                    "id": b,
                    "kind": "agent",
                    "agent": f"bench-{b}",
                    "prompt": f"Angle {b} on {{topic}}",
                }
                for b in branches
            ),
            {"id": "gather", "kind": "join"},
        ],
        "edges": [
            *({"source": "fan", "target": b} for b in branches),
            *({"source": b, "target": "gather"} for b in branches),
        ],
    }
    versions = []
    for slug, spec in (("bench-pipeline", pipeline), ("bench-fanout", fanout)):
        workflow = Workflow.objects.create(name=slug, slug=slug, owner=owner, draft=spec)
        versions.append(workflow.publish(user=owner, note="benchmark"))
    return Design(owner, admin, *versions)


def wait_terminal(
    run_ids: list[int], timeout_s: float = 600, poll_s: float = 0.02, stall_s: float = 30
) -> list[dict]:
    """Poll until every run is terminal; their rows (status, times), in `run_ids` order.
    Figures come from the rows' timestamps, so polling only decides when the next run starts:
    it begins at 2 ms and slows to `poll_s` as the wait grows (a 500 ms run is seen within
    ~5% of its length), since every poll takes CPU from the worker on a 2-core machine.

    Gives up early when no step of these runs changed for `stall_s`: a step whose Celery
    message was lost (say the worker's claim failed on "too many clients") waits for beat's
    sweeper, which a benchmark does not run.
    """
    pending = set(run_ids)
    started = time.monotonic()
    deadline = started + timeout_s
    progress, progress_at = None, time.monotonic()
    checked_at = progress_at
    while pending:
        pending -= set(
            Run.objects.filter(pk__in=pending, status__in=Run.TERMINAL).values_list("pk", flat=True)
        )
        if not pending:
            break
        now = time.monotonic()
        if now > deadline:
            raise BenchError(
                f"{len(pending)} of {len(run_ids)} runs not finished after {timeout_s:.0f} s"
            )
        if now - checked_at > 1:  # at most once a second: this query is not free
            checked_at = now
            counts = Step.objects.filter(run_id__in=pending).aggregate(
                n=Count("id"),
                done=Count("id", filter=Q(status__in=Step.DONE)),
                running=Count("id", filter=Q(status=Step.RUNNING)),
            )
            marker = (len(pending), counts["n"], counts["done"], counts["running"])
            if marker != progress:
                progress, progress_at = marker, now
            elif now - progress_at > stall_s:
                raise BenchError(
                    f"{len(pending)} of {len(run_ids)} runs made no progress for "
                    f"{stall_s:.0f} s (lost doorbells? see the worker log)"
                )
        time.sleep(min(max((now - started) * 0.05, 0.002), poll_s))
    rows = {
        row["pk"]: row
        for row in Run.objects.filter(pk__in=run_ids).values(
            "pk", "status", "error", "created_at", "started_at", "finished_at"
        )
    }
    return [rows[pk] for pk in run_ids]


def _check_succeeded(rows: list[dict]) -> None:
    failed = [row for row in rows if row["status"] != Run.SUCCEEDED]
    if failed:
        first = failed[0]
        raise BenchError(
            f"{len(failed)} of {len(rows)} runs did not succeed; run "
            f"{first['pk']} ended {first['status']}: {first['error'][:300]}"
        )


def _ms(later, earlier) -> float:
    return (later - earlier).total_seconds() * 1000


def warm_up(stack, design: Design, listener: GroupListener, runs: int = 3) -> None:
    """A few unmeasured runs: the worker imports LiteLLM on its first call (seconds) and opens
    its connections; no phase should pay for that, whichever runs first."""
    stack.set_llm(reset=True, latency_ms=0)
    ids = [engine.start_run(design.pipeline, TOPIC, design.owner).pk for _ in range(runs)]
    ids.append(engine.start_run(design.fanout, TOPIC, design.owner).pk)
    _check_succeeded(wait_terminal(ids, poll_s=0.05, stall_s=60))
    listener.wait_published(ids)


# --- W1: pipeline overhead ----------------------------------------------------------------------


def pipeline_overhead(
    stack, design: Design, listener: GroupListener, runs: int, warmup: int
) -> dict:
    """W1: 3-step pipeline, 0 ms LLM, one run after another. Per run: start_run() to the
    run's finished_at; per step: the run's wall / 3, and where each step's time went."""
    stack.set_llm(reset=True, latency_ms=0)
    for _ in range(warmup):
        run = engine.start_run(design.pipeline, TOPIC, design.owner)
        _check_succeeded(wait_terminal([run.pk]))
    walls, starts, ids = [], [], []
    for _ in range(runs):
        t0 = time.time()
        run = engine.start_run(design.pipeline, TOPIC, design.owner)
        starts.append((time.time() - t0) * 1000)
        row = wait_terminal([run.pk])[0]
        _check_succeeded([row])
        walls.append(row["finished_at"].timestamp() * 1000 - t0 * 1000)
        ids.append(run.pk)
    published = listener.wait_published(ids)
    return {
        "run_ms": walls,
        "step_ms": [w / 3 for w in walls],
        "start_call_ms": starts,
        "breakdown": pipeline_breakdown(ids),
        "dashboard_ms": published["latency_ms"],
        "publish_drain_s": published["drain_s"],
        "never_published": published["never_arrived"],
    }


def pipeline_breakdown(run_ids: list[int]) -> dict:
    """Where a W1 step's time goes, from the timestamps the engine stores:

    - hop: step created -> claimed (commit, on-commit publishes, the Celery message, the claim)
    - execute: claimed -> outcome saved (the node: budget checks, the LLM call, its records)
    - llm: the LLM call as runs/llm.py timed it (UsageRecord.latency_ms)
    - advance: outcome saved -> next step created (or -> the run's finished_at for the last)
    """
    runs = {
        row["pk"]: row
        for row in Run.objects.filter(pk__in=run_ids).values("pk", "created_at", "finished_at")
    }
    llm = {
        row["step_id"]: row["latency_ms"]
        for row in UsageRecord.objects.filter(run_id__in=run_ids).values("step_id", "latency_ms")
    }
    by_run: dict[int, list[dict]] = {}
    for step in (
        Step.objects.filter(run_id__in=run_ids)
        .order_by("run_id", "created_at", "id")
        .values("pk", "run_id", "created_at", "started_at", "finished_at")
    ):
        by_run.setdefault(step["run_id"], []).append(step)
    parts: dict[str, list[float]] = {
        "run_to_first_step": [],
        "hop": [],
        "execute": [],
        "llm": [],
        "execute_minus_llm": [],
        "advance": [],
    }
    events = {}
    for row in RunEvent.objects.filter(run_id__in=run_ids).values("run_id"):
        events[row["run_id"]] = events.get(row["run_id"], 0) + 1
    for run_id, steps in by_run.items():
        run = runs[run_id]
        parts["run_to_first_step"].append(_ms(steps[0]["created_at"], run["created_at"]))
        for index, step in enumerate(steps):
            parts["hop"].append(_ms(step["started_at"], step["created_at"]))
            execute = _ms(step["finished_at"], step["started_at"])
            parts["execute"].append(execute)
            parts["llm"].append(llm.get(step["pk"], 0))
            parts["execute_minus_llm"].append(execute - llm.get(step["pk"], 0))
            following = (
                steps[index + 1]["created_at"] if index + 1 < len(steps) else run["finished_at"]
            )
            parts["advance"].append(_ms(following, step["finished_at"]))
    return {"parts_ms": parts, "events_per_run": sum(events.values()) / max(len(events), 1)}


# --- W2: fan-out --------------------------------------------------------------------------------


def fan_out(stack, design: Design, listener: GroupListener, runs: int, warmup: int) -> dict:
    """W2: one input to 10 agents (500 ms LLM each), then a join; runs one after another.
    Besides the wall per run, its timeline: when each milestone was reached, in ms after the
    `start_run` call, from the timestamps the engine stores."""
    stack.set_llm(reset=True, latency_ms=500)
    for _ in range(warmup):
        run = engine.start_run(design.fanout, TOPIC, design.owner)
        _check_succeeded(wait_terminal([run.pk]))
    walls, ids = [], []
    timeline: dict[str, list[float]] = {name: [] for name in W2_MILESTONES}
    for _ in range(runs):
        t0 = timezone.now()
        run = engine.start_run(design.fanout, TOPIC, design.owner)
        row = wait_terminal([run.pk])[0]
        _check_succeeded([row])
        walls.append(_ms(row["finished_at"], t0))
        for name, moment in fan_out_milestones(run.pk, row).items():
            timeline[name].append(_ms(moment, t0))
        ids.append(run.pk)
    published = listener.wait_published(ids)
    return {
        "run_ms": walls,
        "timeline_ms": timeline,
        "dashboard_ms": published["latency_ms"],
        "publish_drain_s": [published["drain_s"]],
        "never_published": [published["never_arrived"]],
    }


W2_MILESTONES = (
    "fan step claimed",
    "branches created",
    "first branch claimed",
    "last branch claimed",
    "first LLM answer recorded",
    "last LLM answer recorded",
    "first branch saved",
    "last branch saved",
    "join claimed",
    "run finished",
)


def fan_out_milestones(run_id: int, row: dict) -> dict:
    steps = list(
        Step.objects.filter(run_id=run_id).values(
            "node_id", "created_at", "started_at", "finished_at"
        )
    )
    branches = [s for s in steps if s["node_id"].startswith("branch")]
    fan = next(s for s in steps if s["node_id"] == "fan")
    join = next(s for s in steps if s["node_id"] == "gather")
    answers = list(UsageRecord.objects.filter(run_id=run_id).values_list("at", flat=True))
    return dict(
        zip(
            W2_MILESTONES,
            (
                fan["started_at"],
                max(b["created_at"] for b in branches),
                min(b["started_at"] for b in branches),
                max(b["started_at"] for b in branches),
                min(answers),
                max(answers),
                min(b["finished_at"] for b in branches),
                max(b["finished_at"] for b in branches),
                join["started_at"],
                row["finished_at"],
            ),
            strict=True,
        )
    )


# --- W3: many runs at once ----------------------------------------------------------------------


def many_runs(
    stack,
    design: Design,
    listener: GroupListener,
    runs: int,
    rounds: int,
    warmup_rounds: int,
    starters: int,
    sampler=None,
) -> dict:
    """W3: `runs` W1 pipelines started at once (200 ms LLM). `starters` threads call start_run
    as 100 users pressing Start together would; total wall = first start_run() call to the last
    run's finished_at. Warm-up rounds open every worker thread's connections first."""
    stack.set_llm(reset=True, latency_ms=200)
    totals, rates, start_phase, per_run, dashboard, drains, lost = [], [], [], [], [], [], []
    barrier = threading.Barrier(starters)

    def start(_index: int) -> int:
        return engine.start_run(design.pipeline, TOPIC, design.owner).pk

    def close_connection(_index: int) -> None:
        barrier.wait(timeout=30)  # one per thread: every starter closes its own connection
        connection.close()

    with ThreadPoolExecutor(starters, thread_name_prefix="starter") as pool:
        for number in range(warmup_rounds + rounds):
            measured = number >= warmup_rounds
            if sampler is not None:
                sampler.phase = "w3" if measured else "w3-warmup"
            t0 = time.time()
            ids = list(pool.map(start, range(runs)))
            started = time.time() - t0
            rows = wait_terminal(ids, poll_s=0.05, stall_s=60)
            _check_succeeded(rows)
            published = listener.wait_published(ids)
            if not measured:
                continue
            dashboard.extend(published["latency_ms"])
            drains.append(published["drain_s"])
            lost.append(published["never_arrived"])
            lost.append(published["never_arrived"])
            end = max(row["finished_at"] for row in rows).timestamp()
            steps = Step.objects.filter(run_id__in=ids, status=Step.SUCCEEDED).count()
            totals.append(end - t0)
            rates.append(steps / (end - t0))
            start_phase.append(started)
            per_run.extend(_ms(row["finished_at"], row["created_at"]) for row in rows)
        list(pool.map(close_connection, range(starters)))
    if sampler is not None:
        sampler.phase = "idle"
    return {
        "total_s": totals,
        "steps_per_s": rates,
        "start_phase_s": start_phase,
        "run_ms": per_run,
        "dashboard_ms": dashboard,
        "publish_drain_s": drains,
        "never_published": lost,
    }


# --- live latency -------------------------------------------------------------------------------


def session_cookie(user) -> str:
    """A logged-in session for `user` (django.contrib.auth, stored in the database)."""
    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


def live_latency(stack, design: Design, clients: int, runs: int) -> dict:
    """`clients` WebSocket clients on ws/runs/<id>/ through Daphne; per event, from the
    RunEvent's created_at (stamped in the worker inside the step's transaction) to the arrival
    of its fragment at each client.

    1. Start a run and pause it in the same transaction: it exists, nothing executes.
    2. Connect every client; each says hello with last_seq - 1 and so receives exactly one
       stored event: proof that the consumer is live.
    3. Resume the run and wait for it to finish and for every client to hold its last event.
    """
    stack.set_llm(reset=True, latency_ms=200)
    cookie = session_cookie(design.owner)
    samples: dict[str, list[float]] = {}
    connect_ms: list[float] = []
    streamed = reconnects = out_of_order = published = 0
    timelines = []
    for _ in range(runs):
        result = asyncio.run(_live_round(stack, design, clients, cookie))
        for kind, values in result["latency_ms"].items():
            samples.setdefault(kind, []).extend(values)
        connect_ms.extend(result["connect_ms"])
        streamed += result["stream_messages"]
        reconnects += result["reconnects"]
        out_of_order += result["out_of_order"]
        published += result["published"]
        timelines.append(result["timeline"])
    every = [v for kind, values in samples.items() if not kind.startswith("group:") for v in values]
    group = [v for kind, values in samples.items() if kind.startswith("group:") for v in values]
    return {
        "step_finished_ms": samples.get("step.finished", []),
        "all_events_ms": every,
        "group_ms": group,
        "by_kind_ms": samples,
        "connect_ms": connect_ms,
        "stream_messages": streamed,
        "reconnects": reconnects,
        "timelines": timelines,
        "out_of_order": out_of_order,
        "published": published,
    }


def _paused_run(design: Design) -> tuple[int, int]:
    with transaction.atomic():
        run = engine.start_run(design.pipeline, TOPIC, design.owner)
        engine.pause_run(run, design.owner)
    return run.pk, Run.objects.values_list("last_seq", flat=True).get(pk=run.pk)


def _resume(run_id: int, owner) -> None:
    engine.resume_run(Run.objects.get(pk=run_id), owner)


async def _live_round(stack, design: Design, clients: int, cookie: str) -> dict:
    import aiohttp

    run_id, last_seq = await asyncio.to_thread(_paused_run, design)
    url = f"ws://127.0.0.1:{stack.web_port}/ws/runs/{run_id}/"
    headers = {"Origin": stack.web_url, "Cookie": f"{settings.SESSION_COOKIE_NAME}={cookie}"}
    arrivals: list[dict[int, float]] = [{} for _ in range(clients)]
    streams = [0] * clients
    reconnects = [0] * clients
    gate = asyncio.Semaphore(20)  # connect in waves, as page loads would
    connect_ms: list[float] = []
    stopping = asyncio.Event()

    async def follow(http, index: int) -> None:
        """One browser tab: connect, say hello with the last seq applied, forward nothing;
        when the server closes the socket, reconnect at once and carry on from the last seq
        (what the page's htmx ws extension does, minus its back-off)."""
        hello = last_seq - 1
        while not stopping.is_set():
            async with gate:
                began = time.perf_counter()
                ws = await http.ws_connect(url, headers=headers, heartbeat=None, max_msg_size=0)
                if not reconnects[index]:
                    connect_ms.append((time.perf_counter() - began) * 1000)
            try:
                await ws.send_str(json.dumps({"last_seq": hello}))
                async for message in ws:
                    now = time.time()
                    if message.type != aiohttp.WSMsgType.TEXT:
                        continue
                    seqs = EVENT_LINE.findall(message.data)
                    for seq in seqs:
                        arrivals[index].setdefault(int(seq), now)
                    if not seqs:
                        streams[index] += 1
            finally:
                await ws.close()
            if not stopping.is_set():
                reconnects[index] += 1
                hello = max(arrivals[index], default=last_seq - 1)

    async def until(condition, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise BenchError(f"live latency: {what} within {timeout_s:.0f} s")
            await asyncio.sleep(0.01)

    # The run's group as Redis delivers it, before any consumer: the order the publishers'
    # messages really arrive in. A consumer that sees a seq skipped re-reads the gap from the
    # database (and renders it) before it forwards anything else.
    raw = await asyncio.to_thread(lambda: GroupListener(events.run_group(run_id)).start())
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        tasks = [asyncio.create_task(follow(http, i)) for i in range(clients)]
        try:
            await until(
                lambda: all(last_seq in a for a in arrivals) or any(t.done() for t in tasks),
                120,
                "not every client received its replayed event",
            )
            for task in tasks:
                if task.done():
                    task.result()  # a client that could not connect: raise its error
            await asyncio.to_thread(_resume, run_id, design.owner)
            rows = await asyncio.to_thread(wait_terminal, [run_id])
            _check_succeeded(rows)
            final = await asyncio.to_thread(
                lambda: Run.objects.values_list("last_seq", flat=True).get(pk=run_id)
            )
            missing = lambda: sum(final not in a for a in arrivals)  # noqa: E731
            await until(
                lambda: missing() == 0, 60, "not every client received the run's last event"
            )
        finally:
            stopping.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.to_thread(raw.stop)
    stored = await asyncio.to_thread(
        lambda: list(
            RunEvent.objects.filter(run_id=run_id, seq__gt=last_seq).values_list(
                "seq", "kind", "created_at"
            )
        )
    )
    latency: dict[str, list[float]] = {}
    timeline = []  # per event: when it was stored (after the first) and how late it arrived
    for seq, kind, created_at in stored:
        stamp = created_at.timestamp()
        late = [(client[seq] - stamp) * 1000 for client in arrivals if seq in client]
        latency.setdefault(kind, []).extend(late)
        group_at = raw.arrivals.get(run_id, {}).get(seq)
        if group_at is not None:
            latency.setdefault("group:" + kind, []).append((group_at - stamp) * 1000)
        timeline.append(
            {
                "seq": seq,
                "kind": kind,
                "stored_ms": round((stamp - stored[0][2].timestamp()) * 1000, 1),
                "group_ms": round((group_at - stamp) * 1000, 1) if group_at else None,
                "median_ms": round(statistics.median(late), 1) if late else None,
                "max_ms": round(max(late), 1) if late else None,
            }
        )
    return {
        "latency_ms": latency,
        "connect_ms": connect_ms,
        "stream_messages": sum(streams),
        "reconnects": sum(reconnects),
        "timeline": timeline,
        "out_of_order": raw.out_of_order(),
        "published": len(raw.order),
    }


# --- reports ------------------------------------------------------------------------------------


def reports(stack, design: Design, records: int, runs: int, requests: int) -> dict:
    """Server time of /costs/ and /runs/ through Daphne with `records` usage records over
    `runs` runs (make_usage_fixture), for a staff user (sees everything) and a member."""
    import httpx
    from django.core.management import call_command

    began = time.monotonic()
    out = io.StringIO()
    call_command("make_usage_fixture", records=records, runs=runs, days=90, stdout=out)
    fixture_s = time.monotonic() - began
    member = get_user_model().objects.get(username="fixture-user-01")
    viewers = {"staff": session_cookie(design.admin), "member": session_cookie(member)}
    timings: dict[str, list[float]] = {}
    sizes: dict[str, int] = {}
    with httpx.Client(base_url=stack.web_url, timeout=120) as http:
        for path, name in (("/costs/", "costs"), ("/runs/", "runs")):
            for who, cookie in viewers.items():
                http.cookies.set(settings.SESSION_COOKIE_NAME, cookie)
                key = f"{name}_{who}"
                timings[key] = []
                for number in range(requests + 1):  # the first one warms templates and caches
                    began = time.perf_counter()
                    response = http.get(path)
                    elapsed = (time.perf_counter() - began) * 1000
                    if response.status_code != 200:
                        raise BenchError(
                            f"GET {path} as {who}: HTTP {response.status_code}\n"
                            f"{stack.daphne_log_tails(25)}"
                        )
                    if number:
                        timings[key].append(elapsed)
                    sizes[key] = len(response.content)
    return {
        "ms": timings,
        "bytes": sizes,
        "fixture_s": fixture_s,
        "records": records,
        "runs": runs,
        "usage_rows": UsageRecord.objects.count(),
        "run_rows": Run.objects.count(),
    }
