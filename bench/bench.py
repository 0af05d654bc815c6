"""`make bench`: measure Baton on the real stack and print one table plus a JSON file.

    uv run python -m bench.bench            # the full benchmark (several minutes)
    uv run python -m bench.bench --quick    # small counts, well under a minute of work

Workloads (issue 9; targets are printed beside each figure, the exit code ignores them):
  W1  3-step agent pipeline, 0 ms LLM, runs one after another: wall per run and per step
  W2  one input fanned out to 10 agents (500 ms LLM) and joined: wall per run
  W3  100 W1 runs started at once (200 ms LLM): total wall and steps per second
  live   N WebSocket clients on one run's page socket: event -> fragment latency
  reports  /costs/ and /runs/ with 1M usage records over 100k runs: server time
  memory   RSS of each worker and of each Daphne, per phase
  profile  one process, no Celery: queries and time per W1 step by engine phase

The stack (bench/stack.py) uses PostgreSQL and Redis where DATABASE_URL and REDIS_URL point,
else a temporary SQLite file and an embedded redis-server. Exit code: 0 when every phase
produced its figures (whatever they are), 1 when a phase failed, 2 when the stack did not start.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from bench.stack import ROOT, RssSampler, Stack, StackConfig
from bench.stats import TARGETS, Row, summarize, table

PHASES = ("w1", "w2", "w3", "live", "reports", "profile")

# (full, quick) counts
COUNTS = {
    "w1_runs": (200, 10),
    "w1_warmup": (10, 2),
    "w2_runs": (10, 2),
    "w2_warmup": (2, 0),
    "w3_runs": (100, 10),
    "w3_rounds": (3, 1),
    "w3_warmup_rounds": (1, 0),
    "clients": (200, 10),
    "live_runs": (3, 1),
    "report_records": (1_000_000, 2_000),
    "report_runs": (100_000, 200),
    "report_requests": (10, 2),
    "profile_runs": (10, 1),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="small counts: a smoke run of every phase (CI uses it)"
    )
    parser.add_argument(
        "--only",
        default=",".join(PHASES),
        help=f"comma-separated phases to run (default all: {','.join(PHASES)})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="Celery worker processes (default: one per CPU core)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="threads per worker (default: enough for W3's runs at once, "
        "within PostgreSQL's max_connections)",
    )
    parser.add_argument(
        "--web-processes",
        type=int,
        default=None,
        help="Daphne processes sharing the web port (default: BATON_WEB_PROCESSES, "
        "one per CPU core up to 4)",
    )
    parser.add_argument(
        "--starters",
        type=int,
        default=8,
        help="threads of this process that start W3's runs together",
    )
    parser.add_argument(
        "--db-name",
        default="baton_bench",
        help="database created (and dropped) on DATABASE_URL's server",
    )
    parser.add_argument("--redis-db", type=int, default=9, help="Redis database number")
    parser.add_argument(
        "--keep", action="store_true", help="keep the database and the logs directory afterwards"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON file to write (default bench/results/<timestamp>.json)",
    )
    for name, (full, quick) in COUNTS.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=None,
            help=f"default {full} ({quick} with --quick)",
        )
    args = parser.parse_args(argv)
    for name, (full, quick) in COUNTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.web_processes is not None and args.web_processes < 1:
        parser.error("--web-processes must be at least 1")
    args.phases = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        parser.error(
            f"unknown phase(s) {', '.join(sorted(unknown))}; choose from {', '.join(PHASES)}"
        )
    return args


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = 0
    try:
        import psutil

        memory = psutil.virtual_memory().total
    except ImportError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu or platform.processor(),
        "memory_gib": round(memory / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def reference_ms(compiles: int = 50, repeats: int = 5) -> float:
    """How fast this machine is right now: milliseconds to compile a four-table ORM query (step,
    run, workflow, version: the claim's SELECT before the engine wrote it out) `compiles`
    times, best of `repeats`. The query stays the same so that references stay comparable.
    Pure Python and no I/O, the kind of work most of a step's CPU goes to. The development
    VM's speed drifts by tens of percent within an hour (docs/benchmarks.md): two runs'
    figures compare only at similar reference values. Measured before every phase, with the
    stack idle."""
    from runs.models import Step

    query = Step.objects.filter(pk=1).select_related("run__workflow", "run__version").query
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(compiles):
            query.get_compiler("default").as_sql()
        best = min(best, time.perf_counter() - began)
    return best * 1000


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            text=True,
            capture_output=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _count(number: int) -> str:
    if number >= 1_000_000:
        return f"{number / 1_000_000:.1f}M"
    if number >= 10_000:
        return f"{number / 1000:.0f}k"
    return str(number)


def _mib(values: list[int]) -> list[float]:
    return [v / 2**20 for v in values]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Ctrl-C and SIGTERM both unwind through `finally`, which stops every process we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    config = StackConfig(
        database_url=os.environ.get("DATABASE_URL", ""),
        redis_url=os.environ.get("REDIS_URL", ""),
        db_name=args.db_name,
        redis_db=args.redis_db,
        workers=args.workers,
        keep=args.keep,
    )
    stack = Stack(config)
    began = time.monotonic()
    meta = {
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "quick": args.quick,
        "machine": machine(),
        "loadavg_before": os.getloadavg(),
    }
    results: dict = {}
    rows: list[Row] = []
    errors: dict[str, str] = {}
    sampler = None
    try:
        stack.prepare()
        # Enough threads for W3's runs to all wait on the LLM at once. A running step holds
        # its thread's PostgreSQL connection, and each worker process has two more (its lease
        # thread's and its publisher's); a claim refused with "too many clients" loses its
        # Celery message: stay within what the server has left, keeping room for this process
        # (starters, publisher, listeners) and Daphne.
        wanted = args.concurrency or max(args.w3_runs // args.workers, 8)
        if stack.max_connections and not args.concurrency:
            spare = stack.max_connections - stack.connections_in_use - args.starters - 15
            if spare // args.workers - 2 < wanted:
                wanted = max(spare // args.workers - 2, 4)
                print(
                    f"bench: PostgreSQL has {spare} connections to spare "
                    f"({stack.connections_in_use} of {stack.max_connections} in use): "
                    f"{wanted} threads per worker",
                    flush=True,
                )
        config.concurrency = wanted
        import django

        django.setup()
        from django.conf import settings

        config.web_processes = args.web_processes or settings.BATON_WEB_PROCESSES
        from django.core.management import call_command

        call_command("migrate", verbosity=0, interactive=False)
        print(f"bench: migrated in {time.monotonic() - began:.1f} s", flush=True)
        for what, seconds in stack.start().items():
            print(f"bench: {what} ready after {seconds:.1f} s", flush=True)
        sampler = RssSampler(stack).start()
        meta["stack"] = {
            "database": stack.database,
            "redis": stack.redis,
            "workers": config.workers,
            "pool": "threads",
            "concurrency": config.concurrency,
            "pg_connections": {
                "max": stack.max_connections,
                "in_use_at_start": stack.connections_in_use,
            },
            "daphne": f"{config.web_processes} process(es) on one port",
            "llm": f"fake OpenAI-compatible server ({stack.llm_base_url})",
            "startup_s": round(time.monotonic() - began, 1),
        }
        print(
            f"bench: {stack.database}; {stack.redis}; {config.workers} worker(s) x "
            f"{config.concurrency} threads; {config.web_processes} Daphne process"
            f"{'es' if config.web_processes > 1 else ''}; logs in {stack.var_dir}",
            flush=True,
        )
        run_phases(args, stack, sampler, results, rows, errors)
    except Exception:
        errors["stack"] = traceback.format_exc()
        print(f"bench: the stack failed:\n{errors['stack']}", file=sys.stderr)
    finally:
        if sampler is not None:
            sampler.stop()
            memory_rows(sampler, results, rows)
        stop_began = time.monotonic()
        stack.stop()
        print(f"bench: stack stopped in {time.monotonic() - stop_began:.1f} s", flush=True)
    # Exit code of every worker started (a restart after a stall starts new ones): -11 is a
    # segmentation fault, -15 our own SIGTERM at the end.
    meta["worker_exits"] = [
        [proc.name, proc.pid, proc.popen.poll()]
        for proc in stack.procs
        if proc.name.startswith("worker")
    ]
    meta["wall_s"] = round(time.monotonic() - began, 1)
    meta["loadavg_after"] = os.getloadavg()
    print()
    print(table(rows))
    if errors:
        print()
        for phase, error in errors.items():
            print(f"{phase}: {error.strip().splitlines()[-1]}")
    out = args.out or ROOT / "bench" / "results" / (
        dt.datetime.now().strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "") + ".json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "meta": meta,
        "figures": {row.key: row.as_dict() for row in rows},
        "details": results,
        "errors": errors,
    }
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nbench: wrote {out} ({meta['wall_s']} s)")
    if "stack" in errors:
        return 2
    return 1 if errors else 0


def run_phases(
    args, stack: Stack, sampler: RssSampler, results: dict, rows: list[Row], errors: dict
) -> None:
    from bench import workloads

    design = workloads.make_design(stack.llm_base_url)
    listener = workloads.GroupListener().start()
    began = time.monotonic()
    workloads.warm_up(stack, design, listener)
    print(f"bench: warmed up in {time.monotonic() - began:.1f} s", flush=True)

    def phase(name: str, keys: list[tuple[str, str, str]], body) -> None:
        """Run one phase; on failure, record the error and give its rows an ERROR cell."""
        if name not in args.phases:
            return
        sampler.phase = name
        reference = results.setdefault("reference_ms", {})[name] = reference_ms()
        print(f"bench: {name} ... (machine reference {reference:.1f} ms)", flush=True)
        began = time.monotonic()
        try:
            body()
        except Exception as exc:
            errors[name] = traceback.format_exc()
            print(f"bench: {name} failed: {exc}", file=sys.stderr, flush=True)
            for key, label, unit in keys:
                rows.append(Row(key, label, unit, summarize([]), TARGETS.get(key), error=str(exc)))
            if "made no progress" in str(exc) and stack.workers:
                # A stalled worker: say how it died, or keep its threads' stacks; then carry
                # on with fresh workers.
                for proc in stack.workers:
                    code = proc.popen.poll()
                    state = (
                        f"{proc.name} (pid {proc.pid}) exited with code {code}"
                        + (" (SIGSEGV)" if code == -signal.SIGSEGV else "")
                        if code is not None
                        else f"{proc.name} (pid {proc.pid}) alive"
                    )
                    errors[name] += state + "\n"
                    print(f"bench: {state}", file=sys.stderr, flush=True)
                logs = stack.dump_worker_stacks()
                if logs:
                    errors[name] += f"thread stacks written to {', '.join(logs)}\n"
                stack.restart_workers()
        finally:
            sampler.phase = "idle"
            print(f"bench: {name} took {time.monotonic() - began:.1f} s", flush=True)

    def w1() -> None:
        data = workloads.pipeline_overhead(stack, design, listener, args.w1_runs, args.w1_warmup)
        results["w1"] = {
            "runs": args.w1_runs,
            "llm_latency_ms": 0,
            "run_ms": summarize(data["run_ms"]),
            "step_ms": summarize(data["step_ms"]),
            "start_call_ms": summarize(data["start_call_ms"]),
            "events_per_run": data["breakdown"]["events_per_run"],
            "step_parts_ms": {k: summarize(v) for k, v in data["breakdown"]["parts_ms"].items()},
            "dashboard_ms": summarize(data["dashboard_ms"]),
            "publish_drain_s": data["publish_drain_s"],
            # Dashboard events stored but never published (a failed send is not retried).
            "never_published": data["never_published"],
        }
        rows.append(
            Row(
                "w1_run_ms",
                "W1 pipeline: wall per run",
                "ms",
                results["w1"]["run_ms"],
                TARGETS["w1_run_ms"],
            )
        )
        rows.append(
            Row(
                "w1_step_ms",
                "W1 pipeline: wall per step",
                "ms",
                results["w1"]["step_ms"],
                TARGETS["w1_step_ms"],
            )
        )
        for part in ("hop", "execute_minus_llm", "llm", "advance"):
            rows.append(
                Row(
                    f"w1_{part}_ms",
                    f"  W1 step: {part.replace('_', ' ')}",
                    "ms",
                    results["w1"]["step_parts_ms"][part],
                )
            )

    def w2() -> None:
        data = workloads.fan_out(stack, design, listener, args.w2_runs, args.w2_warmup)
        timeline = data.pop("timeline_ms")
        results["w2"] = {
            "runs": args.w2_runs,
            "branches": workloads.FANOUT,
            "llm_latency_ms": 500,
            **{k: summarize(v) for k, v in data.items()},
            "timeline_ms": {k: summarize(v) for k, v in timeline.items()},
        }
        rows.append(
            Row(
                "w2_run_ms",
                "W2 fan-out 1->10->join: wall per run",
                "ms",
                results["w2"]["run_ms"],
                TARGETS["w2_run_ms"],
            )
        )
        for index, (name, summary) in enumerate(results["w2"]["timeline_ms"].items()):
            rows.append(Row(f"w2_at_{index}_ms", f"  W2 at: {name}", "ms", summary))

    def w3() -> None:
        data = workloads.many_runs(
            stack,
            design,
            listener,
            args.w3_runs,
            args.w3_rounds,
            args.w3_warmup_rounds,
            args.starters,
            sampler,
        )
        results["w3"] = {
            "runs_at_once": args.w3_runs,
            "rounds": args.w3_rounds,
            "llm_latency_ms": 200,
            "starters": args.starters,
            "pool": "threads",
            "workers": stack.config.workers,
            "concurrency": stack.config.concurrency,
            **{k: summarize(v) for k, v in data.items()},
        }
        rows.append(
            Row(
                "w3_total_s",
                f"W3 {args.w3_runs} runs at once: total wall",
                "s",
                results["w3"]["total_s"],
                TARGETS["w3_total_s"],
            )
        )
        rows.append(
            Row("w3_steps_per_s", "W3: steps per second", "steps/s", results["w3"]["steps_per_s"])
        )
        rows.append(
            Row(
                "w3_start_phase_s",
                "  W3: until the last start_run returned",
                "s",
                results["w3"]["start_phase_s"],
            )
        )
        rows.append(
            Row(
                "w3_dashboard_ms",
                "  W3: event -> dashboard listener",
                "ms",
                results["w3"]["dashboard_ms"],
            )
        )
        rows.append(
            Row(
                "w3_publish_drain_s",
                "  W3: events still publishing after the end",
                "s",
                results["w3"]["publish_drain_s"],
            )
        )
        rows.append(
            Row(
                "w3_never_published",
                "  W3: dashboard events never published",
                "count",
                results["w3"]["never_published"],
            )
        )

    def live() -> None:
        data = workloads.live_latency(stack, design, args.clients, args.live_runs)
        results["live"] = {
            "clients": args.clients,
            "runs": args.live_runs,
            "llm_latency_ms": 200,
            "step_finished_ms": summarize(data["step_finished_ms"]),
            "all_events_ms": summarize(data["all_events_ms"]),
            # Event stored -> its message reaches the run's group in Redis (no Daphne).
            "group_ms": summarize(data["group_ms"]),
            "by_kind_ms": {k: summarize(v) for k, v in data["by_kind_ms"].items()},
            "connect_ms": summarize(data["connect_ms"]),
            "stream_messages": data["stream_messages"],
            # The server closed a socket and the client came back (the page does the same).
            "reconnects": data["reconnects"],
            "timelines": data["timelines"],
            # Messages the run's group received after a later seq: each makes every consumer
            # re-read and re-render the gap from the database before forwarding.
            "out_of_order": data["out_of_order"],
            "published": data["published"],
        }
        rows.append(
            Row(
                "live_step_ms",
                f"Live: step.finished -> {args.clients} clients",
                "ms",
                results["live"]["step_finished_ms"],
                TARGETS["live_step_ms"],
            )
        )
        rows.append(
            Row("live_all_ms", "  Live: every event", "ms", results["live"]["all_events_ms"])
        )
        rows.append(
            Row(
                "live_group_ms",
                "  Live: event -> run's group (before Daphne)",
                "ms",
                results["live"]["group_ms"],
            )
        )
        rows.append(
            Row("live_connect_ms", "  Live: WebSocket connect", "ms", results["live"]["connect_ms"])
        )
        rows.append(
            Row(
                "live_reconnects",
                "  Live: sockets the server closed",
                "count",
                summarize([data["reconnects"]]),
            )
        )
        rows.append(
            Row(
                "live_out_of_order",
                "  Live: events published out of seq order",
                "count",
                summarize([data["out_of_order"]]),
            )
        )

    def reports() -> None:
        data = workloads.reports(
            stack, design, args.report_records, args.report_runs, args.report_requests
        )
        results["reports"] = {
            **{k: v for k, v in data.items() if k != "ms"},
            "ms": {k: summarize(v) for k, v in data["ms"].items()},
        }
        size = f"{_count(data['usage_rows'])} records/{_count(data['run_rows'])} runs"
        for name, label in (("costs", "/costs/"), ("runs", "/runs/")):
            for who in ("staff", "member"):
                rows.append(
                    Row(
                        f"report_{name}_{who}_ms",
                        f"Reports: {label} as {who} ({size})",
                        "ms",
                        results["reports"]["ms"][f"{name}_{who}"],
                        TARGETS[f"report_{name}_ms"],
                    )
                )

    def profile() -> None:
        from bench import profile as step_profile

        stack.stop_workers()  # the profile drives execute_step itself, in this process
        results["profile"] = step_profile.profile_steps(stack, design, args.profile_runs)
        stack.purge_queue()
        rows.append(
            Row(
                "profile_queries",
                "Profile: SQL queries per W1 step",
                "queries",
                summarize(results["profile"]["queries_per_step"]["samples"]),
            )
        )
        rows.append(
            Row(
                "profile_step_ms",
                "Profile: execute_step in-process (0 ms LLM)",
                "ms",
                summarize(results["profile"]["step_ms"]["samples"]),
            )
        )
        rows.append(
            Row(
                "profile_step_cpu_ms",
                "Profile: execute_step CPU of its thread",
                "ms",
                summarize(results["profile"]["step_cpu_ms"]["samples"]),
            )
        )
        rows.append(
            Row(
                "profile_publish_ms",
                "Profile: publish one event (render + send)",
                "ms",
                results["profile"]["publish_per_event"]["all"],
            )
        )

    try:
        phase("w1", [("w1_run_ms", "W1 pipeline: wall per run", "ms")], w1)
        phase("w2", [("w2_run_ms", "W2 fan-out: wall per run", "ms")], w2)
        phase("w3", [("w3_total_s", "W3: total wall", "s")], w3)
        phase("live", [("live_step_ms", "Live: step.finished", "ms")], live)
        phase(
            "reports",
            [
                ("report_costs_ms", "Reports: /costs/", "ms"),
                ("report_runs_ms", "Reports: /runs/", "ms"),
            ],
            reports,
        )
        phase("profile", [("profile_queries", "Profile: queries per step", "queries")], profile)
    finally:
        listener.stop()
    rows.append(
        Row(
            "reference_ms",
            "Machine: reference work before each phase",
            "ms",
            summarize(list(results.get("reference_ms", {}).values())),
        )
    )


def memory_rows(sampler: RssSampler, results: dict, rows: list[Row]) -> None:
    by: dict[tuple[str, str], list[int]] = {}
    for phase, name, rss in sampler.samples:
        by.setdefault((phase, name), []).append(rss)
    # CPU seconds per phase and process; "wall" is the phase's length in seconds.
    results["cpu_s"] = sampler.cpu_seconds()
    results["memory_mib"] = {
        f"{phase}/{name}": summarize(_mib(values)) for (phase, name), values in sorted(by.items())
    }
    w3_cpu = results["cpu_s"].get("w3", {})
    for name, seconds in sorted(w3_cpu.items()):
        if name != "wall":
            label = f"CPU: {name} during W3 ({w3_cpu.get('wall', 0):.0f} s wall)"
            rows.append(Row(f"cpu_w3_{name.split()[0]}", label, "cpu-s", summarize([seconds])))
    # Several Daphnes: "daphne (all)" (their sum) is keyed rss_<phase>_daphne, as one was.
    for phase in ("w3", "live"):
        for (sampled_phase, name), values in sorted(by.items()):
            if sampled_phase == phase:
                rows.append(
                    Row(
                        f"rss_{phase}_{name.split()[0]}",
                        f"Memory: RSS of {name} under {phase}",
                        "MiB",
                        summarize(_mib(values)),
                    )
                )


if __name__ == "__main__":
    sys.exit(main())
