"""Where a W1 step's time goes: `engine.execute_step` called in this process, no Celery.

1. Start a W1 run (its Celery doorbells go to a queue nobody reads; the caller purges it) and
   execute each pending step directly, one after another, as a worker would.
2. Per step: wall time, and every SQL query with its duration, attributed to the innermost
   engine function on the stack when it ran (claim, budget, record call, render fragment...).
3. A few more runs under cProfile: cumulative time per step in the functions that matter.
4. The LLM seam alone: runs/llm.complete() against the fake server, streamed and not, the
   scripted provider, and the bare HTTP request with httpx (what LiteLLM adds on top).
5. Publishing: one channel-layer group_send from sync code, and one Celery apply_async.

The LLM answers in 0 ms, so everything measured is Baton's own overhead.
"""

from __future__ import annotations

import asyncio
import cProfile
import json
import pstats
import re
import sys
import time
from collections import Counter, defaultdict

from django.db import connection
from django.test.utils import CaptureQueriesContext

from bench.stats import summarize
from runs import engine, events
from runs.models import Run, RunEvent, Step

# Innermost match wins: a query made while rendering a fragment on commit counts as rendering,
# not as the _after_success that committed.
PHASES = [
    ("runs/fragments.py", "render_dashboard_row", "publish: render dashboard row"),
    ("runs/fragments.py", "render_event", "publish: render event fragment"),
    ("runs/events.py", None, "events: append (seq + insert)"),
    ("runs/context.py", "check_alive", "check_alive"),
    ("runs/context.py", "_reserve_budget", "budget reservation"),
    ("runs/pricing.py", "compute_cost", "pricing"),
    ("runs/context.py", "_record_call", "record LLM call (usage, totals)"),
    ("runs/context.py", "llm", "llm(): replay lookup"),
    ("runs/nodes.py", None, "node: agent, tools"),
    ("runs/engine.py", "_claim", "claim"),
    ("runs/engine.py", "_step_fields", "save outcome: tool calls"),
    ("runs/engine.py", "_save_outcome", "save outcome"),
    ("runs/engine.py", "_finish_if_idle", "advance: finish if idle"),
    ("runs/engine.py", "_finish_run", "advance: finish run"),
    ("runs/engine.py", "_create_step", "advance: create next step"),
    ("runs/engine.py", "_advance", "advance"),
    ("runs/engine.py", "_after_success", "after success: lock run, state"),
    ("runs/engine.py", "execute_step", "execute_step: other"),
]

# Functions whose cumulative time per step the cProfile pass reports: (file, function, label).
HOT = [
    ("runs/engine.py", "execute_step", "execute_step (all)"),
    ("runs/engine.py", "_claim", "claim"),
    ("runs/nodes.py", "agent_node", "node (agent)"),
    ("runs/llm.py", "complete", "llm.complete (client + HTTP)"),
    ("runs/llm.py", "_stream", "  streaming loop"),
    ("runs/context.py", "_streamer", "  token publish"),
    ("runs/context.py", "check_alive", "check_alive"),
    ("runs/context.py", "_reserve_budget", "budget reservation"),
    ("runs/context.py", "_record_call", "record LLM call"),
    ("runs/pricing.py", "compute_cost", "pricing.compute_cost"),
    ("runs/engine.py", "_save_outcome", "save outcome"),
    ("runs/engine.py", "_after_success", "after success (incl. advance + commit hooks)"),
    ("runs/engine.py", "_advance", "advance"),
    ("runs/events.py", "append_event", "append_event"),
    ("runs/events.py", "append_events", "append_events"),
    ("runs/events.py", "publish_event", "publish_event (on commit)"),
    ("runs/fragments.py", "render_event", "  render_event"),
    ("runs/fragments.py", "render_dashboard_row", "  render_dashboard_row"),
    ("runs/events.py", "_send", "  channel layer group_send"),
    ("runs/events.py", "publish_tokens", "publish_tokens"),
    ("celery/app/task.py", "apply_async", "Celery apply_async (doorbell)"),
    ("teams/models.py", "get_spec", "WorkflowVersion.get_spec"),
]

_TABLE = re.compile(r'(?:FROM|INTO|UPDATE)\s+"?(\w+)"?', re.I)


def profile_steps(stack, design, runs: int) -> dict:
    stack.set_llm(reset=True, latency_ms=0)
    _execute_run(design)  # warm: imports LiteLLM, opens connections, fills caches

    samples, cpu_samples, query_counts, sql_ms = [], [], [], []
    by_phase: Counter = Counter()
    phase_ms: defaultdict = defaultdict(float)
    by_table: Counter = Counter()
    statements: Counter = Counter()
    recorder = _Recorder()
    steps = 0
    run_ids = []
    for _ in range(runs):
        for step_id in _steps_of_new_run(design, run_ids):
            _flush_publisher()  # the last step's events render in the background: not now
            recorder.reset()
            with (
                connection.execute_wrapper(recorder),
                CaptureQueriesContext(connection) as captured,
            ):
                began, began_cpu = time.perf_counter(), time.thread_time()
                engine.execute_step(step_id)
                elapsed = (time.perf_counter() - began) * 1000
                cpu_ms = (time.thread_time() - began_cpu) * 1000
            steps += 1
            samples.append(elapsed)
            cpu_samples.append(cpu_ms)
            query_counts.append(len(captured.captured_queries))
            sql_ms.append(sum(ms for _, _, ms in recorder.queries))
            for phase, sql, ms in recorder.queries:
                by_phase[phase] += 1
                phase_ms[phase] += ms
                match = _TABLE.search(sql)
                by_table[match.group(1) if match else "-"] += 1
                statements[sql.split(None, 1)[0].upper()] += 1

    profiler = cProfile.Profile()
    profiled_steps = 0
    for _ in range(max(1, runs // 2)):
        for step_id in _steps_of_new_run(design, []):
            _flush_publisher()
            profiler.enable()
            engine.execute_step(step_id)
            profiler.disable()
            profiled_steps += 1
    hot = _hot_functions(profiler, profiled_steps)

    event_count = RunEvent.objects.filter(run__version=design.pipeline).count()
    step_count = Step.objects.filter(run__version=design.pipeline).count()
    return {
        "steps": steps,
        "step_ms": {"samples": samples, **summarize(samples)},
        # This thread's CPU only: not PostgreSQL's, nor the publisher thread's.
        "step_cpu_ms": {"samples": cpu_samples, **summarize(cpu_samples)},
        "queries_per_step": {"samples": query_counts, **summarize(query_counts)},
        "sql_ms_per_step": summarize(sql_ms),
        "queries_by_phase": {
            phase: {
                "per_step": round(count / steps, 2),
                "ms_per_step": round(phase_ms[phase] / steps, 3),
            }
            for phase, count in by_phase.most_common()
        },
        "queries_by_table": {t: round(c / steps, 2) for t, c in by_table.most_common()},
        "statements": {s: round(c / steps, 2) for s, c in statements.most_common()},
        "events_per_step": round(event_count / max(step_count, 1), 2),
        "database_ms": database_baseline(design),
        "cprofile_ms_per_step": hot,
        "publish_per_event": publish_cost(run_ids),
        "llm_seam_ms": llm_seam(stack),
        "publish_ms": publishing(),
    }


class _Recorder:
    """connection.execute_wrapper: times each query and names the engine phase it ran in."""

    def __init__(self):
        self.queries: list[tuple[str, str, float]] = []

    def reset(self) -> None:
        self.queries = []

    def __call__(self, execute, sql, params, many, context):
        began = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            self.queries.append(
                (_phase_of(sys._getframe(1)), sql, (time.perf_counter() - began) * 1000)
            )


def _phase_of(frame) -> str:
    while frame is not None:
        code = frame.f_code
        for path, function, label in PHASES:
            if code.co_filename.endswith(path) and function in (None, code.co_name):
                return label
        frame = frame.f_back
    return "other"


def _flush_publisher() -> None:
    """Wait for runs/events.py's background publisher, where there is one."""
    flush = getattr(events, "flush", None)
    if flush is not None:
        flush()


def _steps_of_new_run(design, run_ids: list[int]):
    """Start a W1 run and yield its steps' ids as they become pending, executing none itself:
    the caller executes each one, which creates the next."""
    run = engine.start_run(design.pipeline, {"topic": "durable agents"}, design.owner)
    run_ids.append(run.pk)
    done: set[int] = set()
    while True:
        pending = list(
            Step.objects.filter(run=run, status=Step.PENDING)
            .exclude(pk__in=done)
            .values_list("pk", flat=True)
        )
        if not pending:
            break
        for step_id in pending:
            done.add(step_id)
            yield step_id
    run.refresh_from_db()
    if run.status != Run.SUCCEEDED:
        raise RuntimeError(f"profile run {run.pk} ended {run.status}: {run.error}")


def _execute_run(design) -> None:
    for step_id in _steps_of_new_run(design, []):
        engine.execute_step(step_id)


def _hot_functions(profiler: cProfile.Profile, steps: int) -> dict:
    stats = pstats.Stats(profiler)
    totals: dict[str, float] = {}
    for (filename, _line, function), row in stats.stats.items():  # type: ignore[attr-defined]
        cumulative = row[3]
        for path, name, label in HOT:
            if filename.endswith(path) and function == name:
                totals[label] = totals.get(label, 0.0) + cumulative
    ordered = {}
    for _path, _name, label in HOT:
        if label in totals:
            ordered[label] = round(totals[label] * 1000 / max(steps, 1), 3)
    return ordered


def database_baseline(design, calls: int = 50) -> dict:
    """The floor under every query: a round trip, and a one-row write with its commit (which
    waits for the WAL flush on PostgreSQL with synchronous_commit on)."""
    from teams.models import Role

    role = Role.objects.get(name="Bench agent")
    timings: dict[str, list[float]] = defaultdict(list)
    for number in range(calls):
        began = time.perf_counter()
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        timings["SELECT 1"].append((time.perf_counter() - began) * 1000)
        began = time.perf_counter()
        Role.objects.filter(pk=role.pk).update(backstory=f"write {number}")
        timings["one-row UPDATE + COMMIT"].append((time.perf_counter() - began) * 1000)
    result = {label: summarize(values) for label, values in timings.items()}
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SHOW synchronous_commit")
            result["synchronous_commit"] = cursor.fetchone()[0]
    return result


def publish_cost(run_ids: list[int]) -> dict:
    """What publishing stored events costs (render their fragments, send them to the run's
    group and, for run.* kinds, the dashboard's), timed here again on the same events, in this
    thread, until sent. "all": one event at a time, with a page open on each run; "batched":
    each run's events as one batch, per event (a busy worker's publisher takes every event
    queued so far as one batch); "unwatched": one at a time with no page open on the run."""
    _flush_publisher()
    timings: dict[str, list[float]] = defaultdict(list)
    queries: list[int] = []
    stored = list(RunEvent.objects.filter(run_id__in=run_ids).order_by("run_id", "seq"))

    def publish(batch: list, label: str) -> None:
        with CaptureQueriesContext(connection) as captured:
            began = time.perf_counter()
            events.publish_events(batch)
            _flush_publisher()
            elapsed = (time.perf_counter() - began) * 1000
        timings[label].extend([elapsed / len(batch)] * len(batch))
        if label == "all":
            timings[batch[0].kind].append(elapsed)
            queries.append(len(captured.captured_queries))

    for event in stored:
        publish([event], "unwatched")
    for run_id in run_ids:
        events.watch(events.run_group(run_id), "bench-profile")
    try:
        for event in stored:
            publish([event], "all")
        for run_id in run_ids:
            publish([event for event in stored if event.run_id == run_id], "batched")
    finally:
        for run_id in run_ids:
            events.unwatch(events.run_group(run_id), "bench-profile")
    result = {kind: summarize(values) for kind, values in timings.items()}
    result["queries"] = summarize(queries)
    return result


def llm_seam(stack, calls: int = 30) -> dict:
    """runs/llm.complete() against the fake server (0 ms) and the scripted provider, streamed
    and not, next to the bare HTTP request the fake server answers."""
    import httpx
    import openai

    from runs import llm

    messages = [
        {
            "role": "system",
            "content": "You are Bench agent.\n\nYour goal: Answer briefly and precisely",
        },
        {"role": "user", "content": "Step 1: work on durable agents"},
    ]
    timings: dict[str, list[float]] = defaultdict(list)
    model = "openai/gpt-4o-mini"
    for _ in range(3):  # warm connections and imports
        llm.complete(model, messages, api_base=stack.llm_base_url)
        llm.complete(model, messages, api_base=stack.llm_base_url, on_text=lambda _t: None)
    body = {"model": "gpt-4o-mini", "messages": messages, "temperature": 0.2}
    # The OpenAI SDK that LiteLLM itself wraps, used directly: what a thinner seam would cost.
    sdk = openai.OpenAI(base_url=stack.llm_base_url, api_key="sk-none", max_retries=0)
    with httpx.Client(base_url=stack.llm_base_url, timeout=30) as http:
        for _ in range(calls):
            for label, kwargs in (
                ("fake server, not streamed", {"api_base": stack.llm_base_url}),
                (
                    "fake server, streamed",
                    {"api_base": stack.llm_base_url, "on_text": lambda _t: None},
                ),
            ):
                began = time.perf_counter()
                llm.complete(model, messages, **kwargs)
                timings[label].append((time.perf_counter() - began) * 1000)
            for label, kwargs in (
                ("scripted, not streamed", {}),
                ("scripted, streamed", {"on_text": lambda _t: None}),
            ):
                began = time.perf_counter()
                llm.complete("scripted/baton", messages, **kwargs)
                timings[label].append((time.perf_counter() - began) * 1000)
            began = time.perf_counter()
            http.post("/chat/completions", json=body).json()
            timings["bare HTTP (httpx), not streamed"].append((time.perf_counter() - began) * 1000)
            began = time.perf_counter()
            with http.stream(
                "POST", "/chat/completions", json={**body, "stream": True}
            ) as response:
                chunks = [
                    json.loads(line[6:])
                    for line in response.iter_lines()
                    if line.startswith("data: {")
                ]
            timings["bare HTTP (httpx), streamed"].append((time.perf_counter() - began) * 1000)
            began = time.perf_counter()
            sdk.chat.completions.create(model="gpt-4o-mini", messages=messages)
            timings["OpenAI SDK, not streamed"].append((time.perf_counter() - began) * 1000)
            began = time.perf_counter()
            text = "".join(
                chunk.choices[0].delta.content or ""
                for chunk in sdk.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=messages,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                if chunk.choices
            )
            timings["OpenAI SDK, streamed"].append((time.perf_counter() - began) * 1000)
    sdk.close()
    result = {label: summarize(values) for label, values in timings.items()}
    result["stream_chunks"] = len(chunks)
    result["answer_chars"] = len(text)
    return result


def publishing(calls: int = 50) -> dict:
    """One group_send from sync code (what runs/events.py does per event and per dashboard
    row) and one Celery apply_async (the doorbell), each on its own; next to a group_send
    from one long-lived event loop, and asking Redis whether a group has any member."""
    from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers

    from runs.tasks import execute_step_task

    timings: dict[str, list[float]] = defaultdict(list)
    message = {"type": "run.event", "run_id": 0, "seq": 0, "kind": "bench", "html": "x" * 4000}
    layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)

    async def from_one_loop() -> list[float]:
        spent = []
        for _ in range(calls + 3):
            began = time.perf_counter()
            await layer.group_send("bench-nobody-listens", message)
            spent.append((time.perf_counter() - began) * 1000)
        return spent[3:]

    timings["channel layer group_send from one long-lived loop"] = asyncio.run(from_one_loop())
    for _ in range(calls):
        began = time.perf_counter()
        events.is_watched(0)
        timings["events.is_watched (does anyone watch?)"].append(
            (time.perf_counter() - began) * 1000
        )
    for number in range(calls + 3):
        began = time.perf_counter()
        events.publish_to_group("bench-nobody-listens", message)
        events.flush()
        if number >= 3:
            timings["group_send from sync code via the publisher's loop, until sent"].append(
                (time.perf_counter() - began) * 1000
            )
        began = time.perf_counter()
        execute_step_task.apply_async((0,))  # step 0 does not exist: a worker would ignore it
        if number >= 3:
            timings["Celery apply_async"].append((time.perf_counter() - began) * 1000)
    return {label: summarize(values) for label, values in timings.items()}
