"""Run: what executed, step by step, what it cost, and the event log the dashboard shows."""

import secrets
import uuid
from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import F, Q
from django.db.models.functions import Coalesce
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_delete
from django.dispatch import receiver

ZERO = Decimal(0)


class RunQuerySet(models.QuerySet):
    def for_user(self, user) -> "RunQuerySet":
        """A user sees the runs of workflows they can see (staff see all)."""
        if not user.is_authenticated:
            return self.none()
        if user.is_staff:
            return self.all()
        from teams.models import Workflow

        visible = Workflow.objects.filter(Q(owner=user) | Q(members=user)).values("pk")
        return self.filter(Q(workflow__in=visible) | Q(started_by=user))

    def active(self) -> "RunQuerySet":
        return self.filter(status__in=Run.ACTIVE)


class Run(models.Model):
    QUEUED, RUNNING, WAITING_APPROVAL, PAUSED = "queued", "running", "waiting_approval", "paused"
    SUCCEEDED, FAILED, CANCELLED, BUDGET_EXCEEDED = (
        "succeeded",
        "failed",
        "cancelled",
        "budget_exceeded",
    )
    STATUSES = [
        (QUEUED, "Queued"),
        (RUNNING, "Running"),
        (WAITING_APPROVAL, "Waiting for approval"),
        (PAUSED, "Paused"),
        (SUCCEEDED, "Succeeded"),
        (FAILED, "Failed"),
        (CANCELLED, "Cancelled"),
        (BUDGET_EXCEEDED, "Budget exceeded"),
    ]
    ACTIVE = (QUEUED, RUNNING, WAITING_APPROVAL, PAUSED)
    TERMINAL = (SUCCEEDED, FAILED, CANCELLED, BUDGET_EXCEEDED)

    workflow = models.ForeignKey("teams.Workflow", on_delete=models.PROTECT, related_name="runs")
    version = models.ForeignKey(
        "teams.WorkflowVersion", on_delete=models.PROTECT, related_name="runs"
    )
    input = models.JSONField(default=dict)
    state = models.JSONField(default=dict)
    result = models.JSONField(null=True, blank=True)
    status = models.CharField(max_length=20, choices=STATUSES, default=QUEUED, db_index=True)
    started_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="runs",
    )
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children"
    )
    parent_step = models.ForeignKey(
        "Step",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="child_runs",
        help_text="The subworkflow step of the parent run that started this run.",
    )
    forked_from_step = models.ForeignKey(
        "Step", null=True, blank=True, on_delete=models.SET_NULL, related_name="forks"
    )
    # Per-node overrides a fork or a user asked for: {node_id: {"prompt": ..., "model": ...}}.
    overrides = models.JSONField(default=dict, blank=True)
    budget = models.JSONField(default=dict, blank=True)
    # How often each loop edge was followed: {"source->target": n}.
    edge_counts = models.JSONField(default=dict, blank=True)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    total_tokens = models.PositiveBigIntegerField(default=0)
    cost = models.DecimalField(max_digits=14, decimal_places=8, default=ZERO)
    # Cost set aside for LLM calls in flight, so parallel branches cannot overrun the budget.
    reserved_cost = models.DecimalField(max_digits=14, decimal_places=8, default=ZERO)
    reserved_tokens = models.PositiveBigIntegerField(default=0)
    step_count = models.PositiveIntegerField(default=0)
    cancel_requested = models.BooleanField(default=False)
    error = models.TextField(blank=True)
    blocked_on = models.CharField(max_length=200, blank=True)
    trace_id = models.UUIDField(default=uuid.uuid4, editable=False)
    last_seq = models.PositiveBigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = RunQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["workflow", "-created_at"]),
            models.Index(fields=["status", "-created_at"]),
            models.Index(fields=["started_by", "-created_at"]),
        ]

    def __str__(self) -> str:
        return f"Run {self.pk} of {self.workflow_id}"

    def get_absolute_url(self) -> str:
        return f"/runs/{self.pk}/"

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE

    @property
    def duration_s(self) -> float | None:
        if not self.started_at:
            return None
        from django.utils import timezone

        end = self.finished_at or timezone.now()
        return (end - self.started_at).total_seconds()


class Step(models.Model):
    """One execution of one node. Unique per (run, node, iteration): a loop's second pass is
    iteration 1. `attempt` counts how often a worker claimed it (retries, redeliveries)."""

    PENDING, RUNNING, WAITING, SUCCEEDED = "pending", "running", "waiting", "succeeded"
    FAILED, SKIPPED, CANCELLED = "failed", "skipped", "cancelled"
    STATUSES = [
        (PENDING, "Pending"),
        (RUNNING, "Running"),
        (WAITING, "Waiting"),
        (SUCCEEDED, "Succeeded"),
        (FAILED, "Failed"),
        (SKIPPED, "Skipped"),
        (CANCELLED, "Cancelled"),
    ]
    DONE = (SUCCEEDED, FAILED, SKIPPED, CANCELLED)
    ERROR_KINDS = [("transient", "Transient"), ("semantic", "Semantic"), ("permanent", "Permanent")]

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="steps")
    node_id = models.CharField(max_length=120)
    kind = models.CharField(max_length=20)
    iteration = models.PositiveIntegerField(default=0)
    attempt = models.PositiveIntegerField(default=0)
    # Bumped by "retry from this step": recorded LLM calls of older epochs are not replayed.
    epoch = models.PositiveIntegerField(default=0)
    agent = models.ForeignKey(
        "teams.Agent", null=True, blank=True, on_delete=models.SET_NULL, related_name="steps"
    )
    status = models.CharField(max_length=12, choices=STATUSES, default=PENDING, db_index=True)
    # Parallel branches this step belongs to, outermost first: [[parallel_node, branch], ...].
    branches = models.JSONField(default=list, blank=True)
    # For a join: what each branch delivered ({branch: "succeeded" | "failed" | "timeout"}).
    arrivals = models.JSONField(default=dict, blank=True)
    input = models.JSONField(default=dict, blank=True)
    output_text = models.TextField(blank=True)
    output = models.JSONField(null=True, blank=True)
    tool_calls = models.JSONField(default=list, blank=True)
    attempts = models.JSONField(default=list, blank=True)
    model = models.CharField(max_length=200, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    total_tokens = models.PositiveIntegerField(default=0)
    cost = models.DecimalField(max_digits=14, decimal_places=8, default=ZERO)
    latency_ms = models.PositiveIntegerField(default=0)
    error_kind = models.CharField(max_length=10, choices=ERROR_KINDS, blank=True)
    error = models.TextField(blank=True)
    reused_from = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="A fork copies the steps before its fork point instead of running them again.",
    )
    lease_until = models.DateTimeField(null=True, blank=True)
    not_before = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["run", "node_id", "iteration"], name="unique_step_per_iteration"
            )
        ]
        indexes = [models.Index(fields=["status", "lease_until"])]

    def __str__(self) -> str:
        return f"{self.node_id}#{self.iteration} of run {self.run_id}"


class ToolCall(models.Model):
    """One call of a tool by a step. The idempotency key (run, step, call index) is unique, so a
    redelivered step finds the call it already made instead of making it again."""

    PROPOSED, AWAITING_APPROVAL, APPROVED, REJECTED = (
        "proposed",
        "awaiting_approval",
        "approved",
        "rejected",
    )
    SUCCEEDED, FAILED = "succeeded", "failed"
    STATUSES = [
        (PROPOSED, "Proposed"),
        (AWAITING_APPROVAL, "Awaiting approval"),
        (APPROVED, "Approved"),
        (REJECTED, "Rejected"),
        (SUCCEEDED, "Succeeded"),
        (FAILED, "Failed"),
    ]

    step = models.ForeignKey(Step, on_delete=models.CASCADE, related_name="tool_call_records")
    epoch = models.PositiveIntegerField(default=0)
    call_index = models.PositiveIntegerField()
    idempotency_key = models.CharField(max_length=200, unique=True)
    tool = models.CharField(max_length=120)
    llm_call_id = models.CharField(max_length=200, blank=True)
    arguments = models.JSONField(default=dict)
    approved_arguments = models.JSONField(null=True, blank=True)
    status = models.CharField(max_length=20, choices=STATUSES, default=PROPOSED)
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    decision_note = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["step", "call_index"]

    def __str__(self) -> str:
        return f"{self.tool} call {self.call_index} of step {self.step_id}"


class RunEvent(models.Model):
    """Append-only log of everything that happened to a run; the live dashboard is a view of it."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="events")
    seq = models.PositiveBigIntegerField()
    kind = models.CharField(max_length=60)
    payload = models.JSONField(default=dict)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["run", "seq"]
        constraints = [models.UniqueConstraint(fields=["run", "seq"], name="unique_event_seq")]

    def __str__(self) -> str:
        return f"{self.kind} #{self.seq} of run {self.run_id}"

    def save(self, *args, **kwargs):
        if self.pk is not None:
            raise ValueError("Run events are append-only.")
        super().save(*args, **kwargs)


class UsageRecord(models.Model):
    """One LLM call: its usage, its price and the response, so a redelivered step replays the
    call from here instead of paying for it again."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="usage")
    step = models.ForeignKey(Step, null=True, on_delete=models.CASCADE, related_name="usage")
    epoch = models.PositiveIntegerField(default=0)
    call_index = models.PositiveIntegerField(default=0)
    workflow = models.ForeignKey(
        "teams.Workflow", null=True, on_delete=models.SET_NULL, related_name="+"
    )
    agent = models.ForeignKey("teams.Agent", null=True, on_delete=models.SET_NULL, related_name="+")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    model = models.CharField(max_length=200)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    total_tokens = models.PositiveIntegerField(default=0)
    cost = models.DecimalField(max_digits=14, decimal_places=8, default=ZERO)
    price = models.ForeignKey(
        "ModelPrice", null=True, blank=True, on_delete=models.SET_NULL, related_name="usage"
    )
    price_source = models.CharField(max_length=40, blank=True)
    response = models.JSONField(default=dict)
    latency_ms = models.PositiveIntegerField(default=0)
    at = models.DateTimeField()

    class Meta:
        ordering = ["-at"]
        constraints = [
            models.UniqueConstraint(
                fields=["step", "epoch", "call_index"], name="unique_llm_call_per_step"
            )
        ]
        # The cost reports and spend caps sum UsageDaily, not these rows. Records are read by
        # time range (rollup rebuilds), by model and time range (repricing) and, for the
        # reports' runs filtered by agent or model, as the runs that made such calls: the
        # (agent, run) / (model, run) indexes list those run ids in order, each repeat stored
        # once (btree deduplication). The foreign keys have their own indexes.
        indexes = [
            models.Index(fields=["at"], name="usage_at_idx"),
            models.Index(fields=["model", "at"], name="usage_model_at_idx"),
            models.Index(fields=["agent", "run"], name="usage_agent_run_idx"),
            models.Index(fields=["model", "run"], name="usage_model_run_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.model}: {self.total_tokens} tokens, ${self.cost}"


class UsageDaily(models.Model):
    """The daily rollup of UsageRecord that the cost reports read: one row per UTC day,
    workflow, agent, model and user (the run's starter), with the sums of that group's calls.
    A month of reports reads thousands of these rows instead of a million records.

    It changes in the same transaction as the records it sums (runs/costs.py, "daily rollup"):
    1. every recorded LLM call adds itself with an atomic upsert (`costs.add_to_daily_usage`,
       from StepContext._record_call), so parallel workers never lose an increment;
    2. a price recompute rebuilds the days it repriced (`costs.rebuild_daily_usage`), as does
       `manage.py rebuild_usage_rollup`;
    3. deleting a run takes its calls out; deleting an agent, workflow or user moves its rows to
       the "none" key, as SET_NULL does to the records (the receivers below). The foreign keys
       are DO_NOTHING because a plain SET_NULL could collide with an existing "none" row.

    The unique key coalesces NULL ids to 0 so NULLs are not distinct on PostgreSQL and SQLite
    alike; the upsert names the same expressions as its conflict target.
    """

    day = models.DateField()
    workflow = models.ForeignKey(
        "teams.Workflow",
        null=True,
        on_delete=models.DO_NOTHING,
        related_name="+",
        db_index=False,
    )
    agent = models.ForeignKey(
        "teams.Agent", null=True, on_delete=models.DO_NOTHING, related_name="+", db_index=False
    )
    model = models.CharField(max_length=200)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        on_delete=models.DO_NOTHING,
        related_name="+",
        db_index=False,
    )
    cost = models.DecimalField(max_digits=18, decimal_places=8, default=ZERO)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    cached_tokens = models.BigIntegerField(default=0)
    total_tokens = models.BigIntegerField(default=0)
    call_count = models.BigIntegerField(default=0)

    class Meta:
        verbose_name_plural = "daily usage"
        constraints = [
            models.UniqueConstraint(
                F("day"),
                Coalesce("workflow", 0),
                Coalesce("agent", 0),
                F("model"),
                Coalesce("user", 0),
                name="usage_daily_key",
            )
        ]
        # The unique key, led by `day`, serves the unfiltered range; these serve a filter or the
        # access scope (workflow or user). Only a day's first call of a key writes to them: the
        # upserts that follow change sums alone (HOT updates on PostgreSQL).
        indexes = [
            models.Index(fields=["workflow", "day"], name="usage_daily_wf_idx"),
            models.Index(fields=["user", "day"], name="usage_daily_user_idx"),
            models.Index(fields=["agent", "day"], name="usage_daily_agent_idx"),
            models.Index(fields=["model", "day"], name="usage_daily_model_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.day} {self.model}: {self.call_count} calls, ${self.cost}"


# Receivers live here, next to the model, so they are connected in every process (web, worker,
# shell); the SQL is in runs/costs.py, imported on use (it imports this module).


@receiver(pre_delete, sender=Run, dispatch_uid="usage_daily_run_deleted")
def _run_deleted(sender, instance: Run, **kwargs) -> None:
    from runs import costs

    costs.remove_run_from_daily_usage(instance.pk)


@receiver(pre_delete, sender="teams.Workflow", dispatch_uid="usage_daily_workflow_deleted")
def _workflow_deleted(sender, instance, **kwargs) -> None:
    from runs import costs

    costs.fold_deleted_key_in_daily_usage("workflow_id", instance.pk)


@receiver(pre_delete, sender="teams.Agent", dispatch_uid="usage_daily_agent_deleted")
def _agent_deleted(sender, instance, **kwargs) -> None:
    from runs import costs

    costs.fold_deleted_key_in_daily_usage("agent_id", instance.pk)


@receiver(pre_delete, sender=settings.AUTH_USER_MODEL, dispatch_uid="usage_daily_user_deleted")
def _user_deleted(sender, instance, **kwargs) -> None:
    from runs import costs

    costs.fold_deleted_key_in_daily_usage("user_id", instance.pk)


class ModelPrice(models.Model):
    """Price of a model per 1M tokens from `effective_from` on: the newest row not after a call's
    time prices it."""

    SOURCES = [("litellm", "LiteLLM price map"), ("manual", "Entered by an admin")]

    model = models.CharField(max_length=200)
    input_per_1m = models.DecimalField(max_digits=12, decimal_places=6, default=ZERO)
    output_per_1m = models.DecimalField(max_digits=12, decimal_places=6, default=ZERO)
    cached_input_per_1m = models.DecimalField(max_digits=12, decimal_places=6, default=ZERO)
    effective_from = models.DateTimeField()
    source = models.CharField(max_length=16, choices=SOURCES, default="manual")

    class Meta:
        ordering = ["model", "-effective_from"]
        constraints = [
            models.UniqueConstraint(fields=["model", "effective_from"], name="unique_price_start")
        ]

    def __str__(self) -> str:
        return f"{self.model} from {self.effective_from:%Y-%m-%d}"


class ToolHealth(models.Model):
    """Circuit breaker state of a tool across runs."""

    tool = models.CharField(max_length=120, unique=True)
    consecutive_failures = models.PositiveIntegerField(default=0)
    open_until = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)

    class Meta:
        verbose_name_plural = "tool health"

    def __str__(self) -> str:
        return f"{self.tool}: {self.consecutive_failures} failures in a row"


class Switch(models.Model):
    """Global switches. `stop_everything` pauses every active run and blocks new steps."""

    name = models.CharField(max_length=60, unique=True)
    on = models.BooleanField(default=False)
    changed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    changed_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "switches"

    def __str__(self) -> str:
        return f"{self.name}: {'on' if self.on else 'off'}"


class LookupToken(models.Model):
    """One random number, replaced whenever what a step looks up by name changes: an agent, its
    role or tools, a tool, a model price. The claim reads it with the step, and each process
    keeps what it looked up under that number until it changes (runs/nodes.py,
    runs/pricing.py). Random, not a counter: an edit rolled back would take a counter back to
    a number that a process may have cached something under."""

    LOOKUPS = "lookups"

    name = models.CharField(max_length=60, unique=True)
    value = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.name}: {self.value}"


def renew_lookup_token(**kwargs) -> None:
    """Replace the token (a signal receiver): in the change's transaction when it has one, else
    right after the change, so at worst a step claimed in between uses what it kept."""
    value = secrets.randbits(62)
    if not LookupToken.objects.filter(name=LookupToken.LOOKUPS).update(value=value):
        LookupToken.objects.update_or_create(name=LookupToken.LOOKUPS, defaults={"value": value})


for _model in ("teams.Agent", "teams.Role", "teams.Tool", ModelPrice):
    post_save.connect(renew_lookup_token, sender=_model, dispatch_uid="renew_lookup_token")
    post_delete.connect(renew_lookup_token, sender=_model, dispatch_uid="renew_lookup_token")
m2m_changed.connect(
    renew_lookup_token, sender="teams.Agent_tools", dispatch_uid="renew_lookup_token"
)
