"""`python -m bench.chaos`: the fault run behind `make chaos`.

1. Build a private stack: a PostgreSQL database created for this run when DATABASE_URL is set
   (else a SQLite file), our own redis-server on a unix socket, N Celery workers, Celery beat
   (it rings the stuck-step sweeper every 5 s), the fake LLM server in this process.
2. Run the scenarios in order (a: worker SIGKILLs, b: Redis restart, c: a flaky LLM, d: dropped
   database connections), each judged run by run (bench/chaos/scenarios.py).
3. Print one table row per scenario, write the figures as JSON if asked, tear everything down,
   and exit 1 if any run was lost, ended wrong, repeated a side effect or was half-written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

from bench.chaos.stack import ROOT, Stack


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--scenarios", default="abcd", help="which scenarios to run, in order (default: abcd)"
    )
    parser.add_argument("--runs", type=int, default=50, help="a: runs (default 50)")
    parser.add_argument("--kills", type=int, default=10, help="a: worker SIGKILLs (default 10)")
    parser.add_argument("--redis-runs", type=int, default=20, help="b: runs (default 20)")
    parser.add_argument(
        "--redis-down-s", type=float, default=5.0, help="b: seconds Redis stays down (default 5)"
    )
    parser.add_argument("--llm-runs", type=int, default=30, help="c: runs (default 30)")
    parser.add_argument(
        "--fault-rate",
        type=float,
        default=0.3,
        help="c: share of LLM calls that fail (default 0.3)",
    )
    parser.add_argument("--db-runs", type=int, default=20, help="d: runs (default 20)")
    parser.add_argument(
        "--db-drops",
        type=int,
        default=8,
        help="d: times every worker connection is terminated (default 8)",
    )
    parser.add_argument("--workers", type=int, default=2, help="Celery workers (default 2)")
    parser.add_argument("--concurrency", type=int, default=4, help="threads per worker (default 4)")
    parser.add_argument(
        "--latency-ms", type=int, default=200, help="fake LLM latency per call (default 200)"
    )
    parser.add_argument(
        "--llm-timeout-s",
        type=int,
        default=3,
        help="agents' LLM timeout: a hung call becomes a timeout (default 3)",
    )
    parser.add_argument(
        "--lease-s",
        type=int,
        default=None,
        help="BATON_STEP_LEASE_S for the stack (default: the settings' value)",
    )
    parser.add_argument(
        "--visibility-s",
        type=int,
        default=None,
        help="Redis visibility timeout (default: the settings' value)",
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=180.0,
        help="per scenario: runs still active after this are lost (default 180)",
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep var/chaos-<id>/ (logs) and do not drop the database",
    )
    args = parser.parse_args(argv)
    unknown = set(args.scenarios) - set("abcd")
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_id = uuid.uuid4().hex[:8]
    stack = Stack(
        var_dir=ROOT / "var" / f"chaos-{run_id}",
        database_url=os.environ.get("DATABASE_URL", ""),
        run_id=run_id,
        lease_s=args.lease_s,
        visibility_s=args.visibility_s,
    )
    if os.environ.get("REDIS_URL"):
        print("chaos: REDIS_URL is not used: scenario b stops Redis, so the run starts its own.")
    began = time.monotonic()
    rows = []
    try:
        stack.prepare()
        rows = _run(stack, args)
    finally:
        stack.close(keep=args.keep)
    if args.keep:
        print(
            f"chaos: logs kept in {stack.var_dir}"
            + (f"; database {stack.database.name} kept" if stack.database.is_postgres else "")
        )
    total = time.monotonic() - began
    print(_table(rows))
    _print_details(rows)
    print(f"\nmachine: {_machine()}; database: {stack.database.label}; total {total:.0f}s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "machine": _machine(),
                    "database": stack.database.label,
                    "total_s": round(total, 1),
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "rows": [
                        {**vars(r), "duration_s": round(r.duration_s, 1), "ok": r.ok} for r in rows
                    ],
                },
                indent=2,
            )
        )
    ok = bool(rows) and all(r.ok for r in rows)
    print("chaos: PASS" if ok else "chaos: FAIL")
    return 0 if ok else 1


def _run(stack: Stack, args: argparse.Namespace) -> list:
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from bench.chaos import scenarios
    from tests.fake_llm import FakeLLMServer

    call_command("migrate", verbosity=0)
    # This process only starts runs; the announcements of the last ones started may still be
    # queued for Redis when scenario b stops it. They are in the event log all the same, and a
    # traceback per lost announcement would only bury the table.
    logging.getLogger("runs.events").setLevel(logging.ERROR)
    fake = FakeLLMServer(latency_ms=args.latency_ms).start()
    try:
        print(
            f"chaos: {stack.database.label}; starting {args.workers} workers x "
            f"{args.concurrency} threads and beat (lease {settings.BATON_STEP_LEASE_S}s, "
            f"visibility timeout "
            f"{settings.CELERY_BROKER_TRANSPORT_OPTIONS['visibility_timeout']}s)",
            flush=True,
        )
        stack.start_processes(
            workers=args.workers,
            concurrency=args.concurrency,
            queue=settings.CELERY_TASK_DEFAULT_QUEUE,
        )
        chaos = scenarios.Chaos(
            stack,
            fake,
            scenarios.Settings(
                seed=args.seed,
                deadline_s=args.deadline_s,
                llm_timeout_s=args.llm_timeout_s,
                hang_s=args.llm_timeout_s * 3,
            ),
        )
        plan = {
            "a": lambda: scenarios.worker_kills(chaos, args.runs, args.kills),
            "b": lambda: scenarios.redis_restart(chaos, args.redis_runs, args.redis_down_s),
            "c": lambda: scenarios.flaky_llm(chaos, args.llm_runs, args.fault_rate),
            "d": lambda: scenarios.db_drops(chaos, args.db_runs, args.db_drops),
        }
        rows = []
        for key in args.scenarios:
            print(f"chaos: scenario {key} ...", flush=True)
            row = plan[key]()
            print(
                f"chaos:   {row.scenario}: {row.succeeded}/{row.runs} succeeded, "
                f"{row.duration_s:.0f}s{' (skipped)' if row.skipped else ''}",
                flush=True,
            )
            rows.append(row)
            chaos.ensure_workers()
        return rows
    finally:
        fake.stop()


COLUMNS = [
    ("scenario", 30),
    ("runs", 4),
    ("ok", 4),
    ("failed*", 7),
    ("wrong", 5),
    ("lost", 4),
    ("dup", 3),
    ("half", 4),
    ("re-run", 6),
    ("swept", 5),
    ("faults injected", 46),
    ("time", 5),
]


def _table(rows: list) -> str:
    lines = [
        "",
        " | ".join(f"{name:<{width}}" for name, width in COLUMNS),
        "-+-".join("-" * width for _, width in COLUMNS),
    ]
    for r in rows:
        if r.skipped:
            values = [
                r.scenario,
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                f"skipped: {r.skipped}",
                "-",
            ]
        else:
            values = [
                r.scenario,
                r.runs,
                r.succeeded,
                r.failed_explained,
                r.wrong,
                r.lost,
                r.duplicates,
                r.half_written,
                r.rerun,
                r.swept,
                r.faults,
                f"{r.duration_s:.0f}s",
            ]
        cells = zip(values, COLUMNS, strict=True)
        lines.append(" | ".join(f"{str(v):<{width}}" for v, (_, width) in cells))
    lines += [
        "ok = succeeded; failed* = failed with the reason the fault explains; wrong = ended "
        "otherwise;",
        "lost = still active at the deadline, or a step or side effect missing; dup = side "
        "effects beyond one per intended call;",
        "half = half-written (totals, steps, event log); re-run = steps that ran more than "
        "once; swept = doorbells the sweeper rang again",
    ]
    return "\n".join(lines)


def _print_details(rows: list) -> None:
    for r in rows:
        if r.problems:
            print(f"\n{r.scenario}: {len(r.problems)} problem(s)")
            for problem in r.problems[:20]:
                print(f"  - {problem}")
        notes = [f"{n} x {note}" if n > 1 else note for note, n in Counter(r.notes).most_common(8)]
        if notes:
            print(f"\n{r.scenario}: notes")
            for note in notes:
                print(f"  - {note}")


def _machine() -> str:
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )


if __name__ == "__main__":
    sys.exit(main())
