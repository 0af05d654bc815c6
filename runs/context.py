"""What a node may do while its step runs: call an LLM, call a tool, ask a human.

Every LLM call and tool call of a step is recorded under a call index before the step moves on.
A step that runs again (a redelivered task, a retry after a transient error, a resume after an
approval) replays the recorded calls in the same order instead of paying for them or acting twice.
Nothing here holds a transaction open across an LLM or tool call.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

import jsonschema
import referencing.exceptions
from django.conf import settings
from django.db import IntegrityError, InterfaceError, OperationalError, connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from runs import events, hooks, llm, pricing, rows
from runs.models import Run, Step, ToolCall, ToolHealth, UsageRecord
from teams import tools as tool_registry
from teams.models import Agent, Tool


class StepInterrupt(Exception):
    """Stops a step's node function; the engine decides what happens next."""


class WaitingForHuman(StepInterrupt):
    """An approval was requested; the step waits until it is decided."""


class Cancelled(StepInterrupt):
    pass


class LeaseLost(StepInterrupt):
    """Another worker owns this step now (our lease ran out); drop our work. `reserved`: the
    budget our own copy of a call still holds (cost, tokens), to be given back where this is
    caught, after the transaction it rolls back (StepContext.release)."""

    def __init__(self, message: str, reserved: tuple[Decimal, int] = (Decimal(0), 0)):
        super().__init__(message)
        self.reserved = reserved


class BudgetExceeded(StepInterrupt):
    """A budget or spend cap refused a call. `details`: the figures a budget approval shows."""

    def __init__(
        self,
        message: str,
        limit: str,
        suggested_raise: Decimal | None = None,
        details: dict | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.limit = limit
        self.suggested_raise = suggested_raise
        self.details = details or {}


class StepFailed(StepInterrupt):
    """The node cannot produce an output. kind: transient, semantic or permanent."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


class ApprovalRejected(StepInterrupt):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][\w.]*)\}")


def storable(value):
    """What a JSON or text column can hold: PostgreSQL refuses NUL characters and NaN."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {storable(str(k)): storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable(v) for v in value]
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    return value


def lookup(state: dict, path: str):
    value = state
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(path)
    return value


def render(template: str, state: dict) -> str:
    """Fill `{key}` / `{key.sub}` placeholders from the run state; unknown ones stay as they are."""

    def fill(match: re.Match) -> str:
        try:
            value = lookup(state, match.group(1))
        except KeyError:
            return match.group(0)
        if isinstance(value, str):
            return value
        return json.dumps(value, ensure_ascii=False, indent=1)

    return _PLACEHOLDER.sub(fill, template or "")


def render_value(value, state: dict):
    """Templates inside a JSON value (tool arguments, subworkflow input)."""
    if isinstance(value, str):
        match = _PLACEHOLDER.fullmatch(value)
        if match:  # a lone placeholder keeps the value's type
            try:
                return lookup(state, match.group(1))
            except KeyError:
                return value
        return render(value, state)
    if isinstance(value, dict):
        return {k: render_value(v, state) for k, v in value.items()}
    if isinstance(value, list):
        return [render_value(v, state) for v in value]
    return value


@dataclass
class LLMReply:
    text: str
    tool_calls: list[dict]
    model: str
    replayed: bool


@dataclass
class StoredCall:
    """A call stored in the transaction that saves its step's outcome, which writes the step
    and the run each in one UPDATE: the outcome with `step_values` and `step_add`, the run's
    state with `run_add` (the call's tokens and cost, its reservation given back)."""

    record: UsageRecord
    step_values: dict
    step_add: dict
    run_add: dict


_COST_PLACES = Decimal("1e-8")  # as Run.cost stores it


class StepContext:
    """Per-execution helper handed to a node function."""

    def __init__(self, step: Step, run: Run, node: dict, spec: dict):
        self.step = step
        self.run = run
        self.node = node
        self.spec = spec
        # Read by the claim with the step: what the step looks up by name is kept under it.
        self.lookup_token: int | None = getattr(step, "lookup_token", None)
        self.state = run.state
        self._llm_index = 0
        self._tool_index = 0
        self._last_stream = 0.0
        self.messages_log: list[dict] = []
        # A first attempt's last LLM call, made but not stored yet: see record_pending_call(). A
        # caller whose transaction stored it and then rolled back puts it back here.
        self.unrecorded: tuple | None = None

    @property
    def made_tool_calls(self) -> bool:
        return self._tool_index > 0

    # --- checks -----------------------------------------------------------------------------

    def check_alive(self) -> None:
        """Cancellation is a flag checked before every LLM and tool call."""
        row = (
            Step.objects.filter(pk=self.step.pk)
            .values("status", "attempt", "run__cancel_requested", "run__status")
            .first()
        )
        if row is None or row["run__cancel_requested"] or row["run__status"] == Run.CANCELLED:
            raise Cancelled("run cancelled")
        if row["status"] != Step.RUNNING or row["attempt"] != self.step.attempt:
            raise LeaseLost("step taken over by another worker")

    # --- LLM --------------------------------------------------------------------------------

    def llm(
        self,
        agent: Agent,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        stream: bool = True,
    ) -> LLMReply:
        """One durable LLM call: replayed from its UsageRecord when it was already made."""
        self.record_pending_call()
        index = self._llm_index
        self._llm_index += 1
        self.messages_log = messages
        # Only an earlier attempt can have recorded this call: the first one needs no lookup.
        recorded = None
        if self.step.attempt > 1:
            recorded = UsageRecord.objects.filter(
                step=self.step, epoch=self.step.epoch, call_index=index
            ).first()
        if recorded is not None:
            return LLMReply(
                recorded.response.get("text", ""),
                recorded.response.get("tool_calls", []),
                recorded.model,
                True,
            )

        # The claim read the step and its run a moment ago: look again before later calls,
        # or when the run was already asked to cancel.
        if index > 0 or self.run.cancel_requested:
            self.check_alive()
        model = self.current_model(agent)
        estimate_cost, estimate_tokens = self._reserve_budget(
            model, llm.estimate_tokens(messages, tools) + agent.max_tokens, agent.max_tokens
        )
        try:
            result = llm.complete(
                model,
                messages,
                tools=tools,
                temperature=agent.temperature,
                max_tokens=agent.max_tokens,
                timeout=agent.timeout_s,
                api_base=agent.api_base or None,
                on_text=self._streamer() if stream and events.is_watched(self.run.pk) else None,
            )
        except BaseException:
            self.release(estimate_cost, estimate_tokens)
            raise
        if self.step.attempt == 1:
            # No earlier attempt can have recorded this call: it is stored with the step's
            # next write (record_pending_call), in the same transaction when that is the outcome.
            priced = pricing.compute_cost(
                result.model,
                result.prompt_tokens,
                result.completion_tokens,
                result.cached_tokens,
                timezone.now(),
                token=self.lookup_token,
            )
            self.unrecorded = (agent, index, result, estimate_cost, estimate_tokens, priced)
            return LLMReply(result.text, result.tool_calls, result.model, False)
        try:
            record = self._record_call(agent, index, result, estimate_cost, estimate_tokens)
        except BaseException:
            self.release(estimate_cost, estimate_tokens)
            raise
        if record is None:
            # Another attempt of this step recorded this call first (it took the step over
            # while this one was still running): go on with its answer, so both agree.
            self.release(estimate_cost, estimate_tokens)
            recorded = UsageRecord.objects.get(
                step=self.step, epoch=self.step.epoch, call_index=index
            )
            return LLMReply(
                recorded.response.get("text", ""),
                recorded.response.get("tool_calls", []),
                recorded.model,
                True,
            )
        return LLMReply(result.text, result.tool_calls, result.model, False)

    def store_pending_call(self, locked_run: Run) -> StoredCall | None:
        """The outcome transaction's way to store the pending call (it holds `locked_run`, the
        run's row read under its lock): the record's INSERT only, and what the caller is to
        add to the step and the run with its own UPDATEs of them. The daily rollup is the
        caller's too (`costs.add_to_daily_usage`), as its last write. LeaseLost as below."""
        if self.unrecorded is None:
            return None
        *_, result, estimate_cost, estimate_tokens, _ = self.unrecorded
        record = self.record_pending_call(roll_up=False, locked_run=locked_run)
        step_values, step_add = _step_figures(result, record.cost)
        return StoredCall(
            record,
            step_values,
            step_add,
            run_add=_run_figures(result, record.cost, estimate_cost, estimate_tokens),
        )

    def record_pending_call(
        self, *, roll_up: bool = True, locked_run: Run | None = None
    ) -> UsageRecord | None:
        """Store the LLM call a first attempt made last, if it is not stored yet, and return
        its record. The engine calls this inside the transaction that saves the step's
        outcome, so a step that simply succeeds pays one transaction, not two; anything else
        the step does next (another call, a tool call, a question to a human, an interrupt)
        stores it first, so a call is always on record before its consequences.

        `roll_up=False` leaves the daily rollup to the caller (`costs.add_to_daily_usage`),
        to be made the transaction's last write. A call another attempt recorded first means
        that attempt owns the step now: LeaseLost, carrying this call's reservation."""
        if self.unrecorded is None:
            return None
        agent, index, result, estimate_cost, estimate_tokens, priced = self.unrecorded
        record = self._record_call(
            agent, index, result, estimate_cost, estimate_tokens, priced, roll_up, locked_run
        )
        self.unrecorded = None
        if record is None:
            raise LeaseLost(
                "another attempt recorded this step's call first",
                reserved=(estimate_cost, estimate_tokens),
            )
        return record

    def release(self, estimate_cost: Decimal, estimate_tokens: int) -> None:
        """Give back a call's budget reservation. The connection may have died under the call:
        then try once more on a new one; if the database is away, the estimate stays held."""
        if not (estimate_cost or estimate_tokens):
            return
        for _ in range(2):
            try:
                Run.objects.filter(pk=self.run.pk).update(
                    reserved_cost=F("reserved_cost") - estimate_cost,
                    reserved_tokens=F("reserved_tokens") - estimate_tokens,
                )
                return
            except (OperationalError, InterfaceError):
                if connection.in_atomic_block:
                    return
                connection.close()

    def current_model(self, agent: Agent) -> str:
        override = (self.run.overrides.get(self.node["id"]) or {}).get("model")
        models = [override or agent.model, *agent.fallback_models]
        index = min(self.step.input.get("fallback_index", 0), len(models) - 1)
        return models[index]

    def _streamer(self):
        throttle = settings.BATON_STREAM_THROTTLE_MS / 1000

        def on_text(text: str) -> None:
            now = time.monotonic()
            if now - self._last_stream >= throttle:
                self._last_stream = now
                events.publish_tokens(self.run.pk, self.step.pk, text)

        return on_text

    def _reserve_budget(
        self, model: str, estimate_tokens: int, max_completion: int
    ) -> tuple[Decimal, int]:
        """Check every budget before the call and set its estimate aside (compare-and-swap on
        the run row), so parallel branches together overrun a budget by at most one call.
        Returns what was set aside, (cost, tokens): nothing when neither a run budget nor a
        spend cap applies (the common case, which then needs no query at all)."""
        from runs import costs

        budget = self.run.budget or {}
        now = timezone.now()
        wall = budget.get("max_wall_s")
        if wall and self.run.started_at and (now - self.run.started_at).total_seconds() > wall:
            raise BudgetExceeded(f"run wall-clock limit of {wall}s reached", "max_wall_s")
        step_limit = budget.get("max_step_tokens")
        if step_limit and self.step.total_tokens + estimate_tokens > step_limit:
            raise BudgetExceeded(
                f"step token limit {step_limit} would be exceeded: {self.step.total_tokens} used "
                f"+ ~{estimate_tokens} estimated",
                "max_step_tokens",
            )

        max_tokens = budget.get("max_tokens")
        max_cost = budget.get("max_cost")
        workflow = self.run.workflow
        capped = (
            workflow.daily_cost_cap is not None
            or workflow.monthly_cost_cap is not None
            or costs.global_monthly_cap() is not None
        )
        if not (max_tokens or max_cost not in (None, "") or capped):
            return Decimal(0), 0

        prompt_estimate = max(estimate_tokens - max_completion, 0)
        estimate_cost, _, _ = pricing.compute_cost(
            model, prompt_estimate, max_completion, 0, now, token=self.lookup_token
        )
        estimate_cost = Decimal(estimate_cost)
        condition = Q()
        if max_tokens:
            condition &= Q(total_tokens__lte=max_tokens - estimate_tokens - F("reserved_tokens"))
        if max_cost not in (None, ""):
            condition &= Q(cost__lte=Decimal(max_cost) - estimate_cost - F("reserved_cost"))
        deadline = time.monotonic() + 30
        while True:
            updated = Run.objects.filter(condition, pk=self.run.pk).update(
                reserved_cost=F("reserved_cost") + estimate_cost,
                reserved_tokens=F("reserved_tokens") + estimate_tokens,
            )
            if updated:
                break
            run = Run.objects.get(pk=self.run.pk)
            # Only calls in flight stand in the way: wait for them to settle, then look again.
            in_flight = run.reserved_cost > 0 or run.reserved_tokens > 0
            fits_without = (
                not max_tokens or run.total_tokens + estimate_tokens <= max_tokens
            ) and (max_cost in (None, "") or run.cost + estimate_cost <= Decimal(max_cost))
            if not (in_flight and fits_without) or time.monotonic() > deadline:
                break
            self.check_alive()
            time.sleep(0.1)
        if not updated:
            if max_tokens and run.total_tokens + run.reserved_tokens + estimate_tokens > max_tokens:
                raise BudgetExceeded(
                    f"run token budget {max_tokens} would be exceeded: {run.total_tokens} used "
                    f"+ ~{estimate_tokens} estimated",
                    "max_tokens",
                    suggested_raise=Decimal(max(max_tokens // 2, estimate_tokens * 2)),
                )
            raise BudgetExceeded(
                f"run cost budget ${Decimal(max_cost):.4f} would be exceeded: "
                f"${run.cost:.6f} spent + ~${estimate_cost:.6f} estimated for this call",
                "max_cost",
                suggested_raise=max(Decimal(max_cost) / 2, estimate_cost * 4).quantize(
                    Decimal("0.0001")
                ),
            )
        # The workflow's and the global spend caps, past which approvals may let this run go.
        breach = costs.cap_breach(workflow, estimate_cost, allowances=costs.cap_allowances(budget))
        if breach is not None:
            Run.objects.filter(pk=self.run.pk).update(
                reserved_cost=F("reserved_cost") - estimate_cost,
                reserved_tokens=F("reserved_tokens") - estimate_tokens,
            )
            raise BudgetExceeded(
                breach.message,
                "spend_cap",
                suggested_raise=breach.suggested_raise,
                details=breach.figures(),
            )
        return estimate_cost, estimate_tokens

    def _record_call(
        self,
        agent: Agent,
        index: int,
        result,
        estimate_cost: Decimal,
        estimate_tokens: int,
        priced: tuple | None = None,
        roll_up: bool = True,
        locked_run: Run | None = None,
    ) -> UsageRecord | None:
        """Store one call: its UsageRecord, the run's and the step's totals, its events, and
        (`roll_up`) its share of the daily rollup as the last write, since the rollup row of a
        busy key is shared by every run using it; a caller that writes more after this adds
        the record to the rollup itself, last. `priced`: pricing.compute_cost's answer when
        the caller looked it up already. With `locked_run` (the run's row, read under its
        lock in the caller's transaction) the run's and the step's totals are the caller's
        to write (store_pending_call). None, with nothing written, when another attempt of
        the step recorded this call first."""
        from runs import costs

        now = timezone.now()
        cost, price, source = priced or pricing.compute_cost(
            result.model,
            result.prompt_tokens,
            result.completion_tokens,
            result.cached_tokens,
            now,
            token=self.lookup_token,
        )
        with transaction.atomic(savepoint=False):
            record = UsageRecord(
                run=self.run,
                step=self.step,
                epoch=self.step.epoch,
                call_index=index,
                workflow_id=self.run.workflow_id,
                agent=agent,
                user_id=self.run.started_by_id,
                model=result.model,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                cached_tokens=result.cached_tokens,
                total_tokens=result.total_tokens,
                cost=cost,
                price=price,
                price_source=source,
                response=storable({"text": result.text, "tool_calls": result.tool_calls}),
                latency_ms=result.latency_ms,
                at=now,
            )
            # Written out, as the step's other writes (runs/rows.py). A conflict leaves the
            # caller's transaction usable, so no savepoint is needed around this.
            if not rows.insert([record], unless_conflicting=True):
                return None
            if locked_run is not None:
                # Nobody else writes the run before this transaction commits.
                total_tokens = locked_run.total_tokens + result.total_tokens
                total_cost = (locked_run.cost + Decimal(str(cost))).quantize(_COST_PLACES)
            else:
                # The run's row before the step's: the lock order of every engine transaction.
                total_tokens, total_cost = _add_to_run_totals(
                    self.run.pk, result, cost, estimate_cost, estimate_tokens
                )
                values, add = _step_figures(result, cost)
                rows.update(Step, "id = %s", [self.step.pk], values=values, add=add)
            events.append_events(
                self.run.pk,
                [
                    (
                        "llm.called",
                        {
                            "step_id": self.step.pk,
                            "node_id": self.step.node_id,
                            "model": result.model,
                            "tokens": result.total_tokens,
                            "cost": str(cost),
                            "latency_ms": result.latency_ms,
                        },
                    ),
                    ("run.totals", {"tokens": total_tokens, "cost": str(total_cost)}),
                ],
            )
            if roll_up:
                costs.add_to_daily_usage(record)
        self.step.total_tokens += result.total_tokens
        return record

    # --- tools ------------------------------------------------------------------------------

    def call_tool(self, tool: Tool, arguments: dict, llm_call_id: str = "") -> dict:
        """Call a tool at most once per (run, step, call index); ask first when it needs approval.

        Returns {"result": ...} or {"error": ...}; raises WaitingForHuman or ApprovalRejected.
        """
        self.record_pending_call()
        index = self._tool_index
        self._tool_index += 1
        key = f"run{self.run.pk}-step{self.step.pk}-e{self.step.epoch}-call{index}"
        try:
            call, _ = ToolCall.objects.get_or_create(
                idempotency_key=key,
                defaults={
                    "step": self.step,
                    "epoch": self.step.epoch,
                    "call_index": index,
                    "tool": tool.name,
                    "arguments": storable(arguments),
                    "llm_call_id": storable(llm_call_id)[:200],
                },
            )
        except IntegrityError:
            call = ToolCall.objects.get(idempotency_key=key)
        if call.status == ToolCall.SUCCEEDED:
            return {"result": call.result}
        if call.status == ToolCall.FAILED:
            return {"error": call.error}
        if call.status == ToolCall.REJECTED:
            raise ApprovalRejected(call.decision_note or "rejected by a human")
        if call.status == ToolCall.AWAITING_APPROVAL:
            raise WaitingForHuman(f"tool {tool.name} awaits approval")

        self.check_alive()
        if tool.requires_approval and call.status == ToolCall.PROPOSED:
            self._ask_tool_approval(tool, call)
        return self._run_tool(tool, call)

    def _ask_tool_approval(self, tool: Tool, call: ToolCall) -> None:
        with transaction.atomic():
            updated = ToolCall.objects.filter(pk=call.pk, status=ToolCall.PROPOSED).update(
                status=ToolCall.AWAITING_APPROVAL
            )
            if updated:
                hooks.request_approval(
                    run=self.run,
                    step=self.step,
                    kind="tool_call",
                    tool_call=call,
                    title=f"Call {tool.name}",
                    payload={"tool": tool.name, "arguments": call.arguments},
                    context=self.approval_context(),
                    due_in_s=self.node.get("due_in_s"),
                    default_outcome=self.node.get("default_outcome", "reject"),
                    approver_group=tool.approver_group,
                )
        raise WaitingForHuman(f"tool {tool.name} awaits approval")

    def _run_tool(self, tool: Tool, call: ToolCall) -> dict:
        arguments = (
            call.approved_arguments if call.approved_arguments is not None else (call.arguments)
        )
        error = self._tool_refusal(tool, arguments)
        result = None
        if error is None:
            try:
                result = tool_registry.call(
                    tool.entrypoint,
                    arguments,
                    tool_registry.ToolContext(self.run.pk, self.step.pk, call.idempotency_key),
                )
                result = storable(json.loads(json.dumps(result)))
            except (OperationalError, InterfaceError):
                # Baton's database failed, not the tool: the call stays proposed and the step
                # is retried (engine._after_database_error); its idempotency key keeps the side
                # effect to one.
                raise
            except Exception as exc:  # a tool's failure is data for the agent, not a crash
                result = None
                error = storable(f"{type(exc).__name__}: {exc}")[:2000]
                _record_tool_health(tool.name, error)
            else:
                _record_tool_health(tool.name, None)
        with transaction.atomic():
            ToolCall.objects.filter(pk=call.pk).update(
                status=ToolCall.FAILED if error else ToolCall.SUCCEEDED,
                result=result,
                error=error or "",
                finished_at=timezone.now(),
            )
            events.append_event(
                self.run.pk,
                "tool.called",
                {
                    "step_id": self.step.pk,
                    "node_id": self.step.node_id,
                    "tool": tool.name,
                    "arguments": arguments,
                    "result": result,
                    "error": error,
                },
            )
        return {"error": error} if error else {"result": result}

    def _tool_refusal(self, tool: Tool, arguments) -> str | None:
        health = ToolHealth.objects.filter(tool=tool.name).first()
        if health and health.open_until and health.open_until > timezone.now():
            return (
                f"circuit open: tool {tool.name} failed {health.consecutive_failures} times "
                f"in a row (last: {health.last_error}); calls fail fast until "
                f"{health.open_until:%H:%M:%S} UTC"
            )
        if tool.entrypoint not in tool_registry.REGISTRY:
            return f"tool entrypoint {tool.entrypoint!r} is not in the registry"
        try:
            jsonschema.validate(arguments, tool.args_schema or {"type": "object"})
        except jsonschema.ValidationError as exc:
            return f"invalid arguments for {tool.name}: {exc.message}"[:2000]
        except (jsonschema.SchemaError, referencing.exceptions.Unresolvable, RecursionError) as exc:
            return f"tool {tool.name} has an unusable args_schema: {exc}"[:2000]
        return None

    # --- humans -----------------------------------------------------------------------------

    def ask_human(self, kind: str, title: str, payload: dict) -> None:
        """Open one approval request for this step (a replay finds it already open)."""
        self.record_pending_call()
        with transaction.atomic():
            # The run's row first, as every transaction that writes a run and its steps does.
            Run.objects.select_for_update(no_key=True).get(pk=self.run.pk)
            locked = Step.objects.select_for_update().get(pk=self.step.pk)
            if locked.input.get("approval_open"):
                return
            hooks.request_approval(
                run=self.run,
                step=self.step,
                kind=kind,
                title=title,
                payload=payload,
                context=self.approval_context(),
                tool_call=None,
                due_in_s=self.node.get("due_in_s"),
                default_outcome=self.node.get("default_outcome", "reject"),
                approver_group=None,
            )
            locked.input = {**locked.input, "approval_open": True}
            locked.save(update_fields=["input"])
        self.step.input["approval_open"] = True

    def approval_context(self) -> dict:
        """What a human needs to decide: the outputs that came before this step."""
        previous = (
            Step.objects.filter(run=self.run, status=Step.SUCCEEDED)
            .exclude(pk=self.step.pk)
            .order_by("-finished_at")[:5]
        )
        return {
            "node": self.node["id"],
            "previous_outputs": [
                {"node": s.node_id, "output": s.output_text[:4000]} for s in previous
            ],
        }


def _step_figures(result, cost: Decimal) -> tuple[dict, dict]:
    """What one call sets on its step's row, and what it adds to it."""
    return {"model": result.model[:200]}, {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.total_tokens,
        "cost": cost,
        "latency_ms": result.latency_ms,
    }


def _run_figures(result, cost: Decimal, reserved_cost: Decimal, reserved_tokens: int) -> dict:
    """What one call adds to its run's row: its tokens and cost, less what was reserved for it."""
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.total_tokens,
        "cost": cost,
        "reserved_cost": -reserved_cost,
        "reserved_tokens": -reserved_tokens,
    }


def _add_to_run_totals(
    run_id: int, result, cost: Decimal, reserved_cost: Decimal, reserved_tokens: int
) -> tuple[int, Decimal]:
    """Add an LLM call to its run's totals and give back what was reserved for it; returns the
    run's new (total_tokens, cost). One statement (the ORM has no UPDATE ... RETURNING): the
    run's row stays locked from here to the commit, and parallel branches wait on it."""
    add = _run_figures(result, cost, reserved_cost, reserved_tokens)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {rows.table(Run)} SET "
            + ", ".join(f"{column} = {column} + %s" for column in add)
            + " WHERE id = %s RETURNING total_tokens, cost",
            [*add.values(), run_id],
        )
        total_tokens, total_cost = cursor.fetchone()
    # SQLite hands a decimal column back as a float: make it the field's Decimal again.
    return total_tokens, Decimal(str(total_cost)).quantize(_COST_PLACES)


def _record_tool_health(tool_name: str, error: str | None) -> None:
    """Count consecutive failures across runs; open the breaker past the threshold."""
    if error is None:
        ToolHealth.objects.filter(tool=tool_name).update(consecutive_failures=0, open_until=None)
        return
    health, _ = ToolHealth.objects.get_or_create(tool=tool_name)
    ToolHealth.objects.filter(pk=health.pk).update(
        consecutive_failures=F("consecutive_failures") + 1, last_error=error[:2000]
    )
    health.refresh_from_db()
    if health.consecutive_failures >= settings.BATON_TOOL_BREAKER_FAILURES:
        ToolHealth.objects.filter(pk=health.pk).update(
            open_until=timezone.now() + timedelta(seconds=settings.BATON_TOOL_BREAKER_COOLDOWN_S)
        )
