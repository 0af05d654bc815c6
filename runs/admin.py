"""Runs in the admin: what executed is viewable (the engine owns it); prices, the tool circuit
breakers and the global switches are the parts an admin configures."""

from django.contrib import admin, messages
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

from runs.costs import recompute_action
from runs.models import (
    LookupToken,
    ModelPrice,
    Run,
    RunEvent,
    Step,
    Switch,
    ToolCall,
    ToolHealth,
    UsageDaily,
    UsageRecord,
)
from teams.admin import JSON_OVERRIDES, ViewOnlyAdmin, pretty_json


def _link(viewname: str, pk, text) -> SafeString:
    if pk is None:
        return "—"
    return format_html('<a href="{}">{}</a>', reverse(viewname, args=[pk]), text)


class StepInline(admin.TabularInline):
    model = Step
    fields = (
        "node_id",
        "kind",
        "iteration",
        "attempt",
        "status",
        "agent",
        "model",
        "total_tokens",
        "cost",
        "latency_ms",
        "error_kind",
        "started_at",
        "finished_at",
    )
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    """Runs are started and advanced by the engine only; here they are viewed and, when they
    are no longer wanted, deleted with everything they recorded."""

    list_display = (
        "id",
        "workflow",
        "version_number",
        "status",
        "started_by",
        "step_count",
        "total_tokens",
        "cost",
        "created_at",
        "duration",
    )
    list_filter = ("status", "workflow", "created_at")
    list_select_related = ("workflow", "version", "started_by")
    search_fields = ("=id", "workflow__name", "workflow__slug", "started_by__username", "error")
    date_hierarchy = "created_at"
    inlines = [StepInline]
    fieldsets = [
        (
            None,
            {
                "fields": (
                    "workflow",
                    "version",
                    "status",
                    "started_by",
                    "parent",
                    "parent_step",
                    "forked_from_step",
                    "cancel_requested",
                    "blocked_on",
                    "error",
                    "trace_id",
                )
            },
        ),
        (
            "Data",
            {
                "fields": (
                    "input_json",
                    "state_json",
                    "result_json",
                    "overrides_json",
                    "budget_json",
                    "edge_counts_json",
                )
            },
        ),
        (
            "Totals",
            {
                "fields": (
                    "prompt_tokens",
                    "completion_tokens",
                    "total_tokens",
                    "cost",
                    "reserved_cost",
                    "reserved_tokens",
                    "step_count",
                    "last_seq",
                )
            },
        ),
        ("Times", {"fields": ("created_at", "started_at", "finished_at", "updated_at")}),
    ]
    readonly_fields = (
        "input_json",
        "state_json",
        "result_json",
        "overrides_json",
        "budget_json",
        "edge_counts_json",
        "trace_id",
        "created_at",
        "updated_at",
    )

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="Version", ordering="version__number")
    def version_number(self, run: Run) -> str:
        return f"v{run.version.number}"

    @admin.display(description="Duration")
    def duration(self, run: Run) -> str:
        seconds = run.duration_s
        return "—" if seconds is None else f"{seconds:.1f} s"

    @admin.display(description="Input")
    def input_json(self, run: Run) -> SafeString:
        return pretty_json(run.input)

    @admin.display(description="State")
    def state_json(self, run: Run) -> SafeString:
        return pretty_json(run.state)

    @admin.display(description="Result")
    def result_json(self, run: Run) -> SafeString:
        return pretty_json(run.result)

    @admin.display(description="Overrides")
    def overrides_json(self, run: Run) -> SafeString:
        return pretty_json(run.overrides)

    @admin.display(description="Budget")
    def budget_json(self, run: Run) -> SafeString:
        return pretty_json(run.budget)

    @admin.display(description="Loop counts")
    def edge_counts_json(self, run: Run) -> SafeString:
        return pretty_json(run.edge_counts)


class ToolCallInline(admin.TabularInline):
    model = ToolCall
    fields = (
        "call_index",
        "epoch",
        "tool",
        "status",
        "idempotency_key",
        "created_at",
        "finished_at",
    )
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Step)
class StepAdmin(ViewOnlyAdmin):
    list_display = (
        "node_id",
        "run",
        "kind",
        "iteration",
        "attempt",
        "status",
        "agent",
        "model",
        "total_tokens",
        "cost",
        "latency_ms",
        "error_kind",
    )
    list_filter = ("status", "kind", "error_kind")
    list_select_related = ("run", "agent")
    search_fields = ("node_id", "=run__id", "model", "error")
    inlines = [ToolCallInline]
    fieldsets = [
        (
            None,
            {
                "fields": (
                    "run_link",
                    "node_id",
                    "kind",
                    "iteration",
                    "attempt",
                    "epoch",
                    "status",
                    "agent",
                    "model",
                    "reused_from",
                    "error_kind",
                    "error",
                )
            },
        ),
        (
            "Data",
            {
                "fields": (
                    "input_json",
                    "output_text",
                    "output_json",
                    "tool_calls_json",
                    "attempts_json",
                    "branches_json",
                    "arrivals_json",
                )
            },
        ),
        (
            "Usage",
            {
                "fields": (
                    "prompt_tokens",
                    "completion_tokens",
                    "total_tokens",
                    "cost",
                    "latency_ms",
                )
            },
        ),
        (
            "Times",
            {
                "fields": (
                    "created_at",
                    "started_at",
                    "finished_at",
                    "lease_until",
                    "not_before",
                )
            },
        ),
    ]
    readonly_fields = (
        "run_link",
        "input_json",
        "output_json",
        "tool_calls_json",
        "attempts_json",
        "branches_json",
        "arrivals_json",
        "created_at",
    )

    @admin.display(description="Run")
    def run_link(self, step: Step) -> SafeString:
        return _link("admin:runs_run_change", step.run_id, step.run)

    @admin.display(description="Input")
    def input_json(self, step: Step) -> SafeString:
        return pretty_json(step.input)

    @admin.display(description="Output")
    def output_json(self, step: Step) -> SafeString:
        return pretty_json(step.output)

    @admin.display(description="Tool calls")
    def tool_calls_json(self, step: Step) -> SafeString:
        return pretty_json(step.tool_calls)

    @admin.display(description="Attempts")
    def attempts_json(self, step: Step) -> SafeString:
        return pretty_json(step.attempts)

    @admin.display(description="Branches")
    def branches_json(self, step: Step) -> SafeString:
        return pretty_json(step.branches)

    @admin.display(description="Arrivals")
    def arrivals_json(self, step: Step) -> SafeString:
        return pretty_json(step.arrivals)


@admin.register(ToolCall)
class ToolCallAdmin(ViewOnlyAdmin):
    list_display = ("tool", "step", "call_index", "epoch", "status", "created_at", "finished_at")
    list_filter = ("status", "tool")
    list_select_related = ("step",)
    search_fields = ("tool", "idempotency_key", "=step__run__id")
    date_hierarchy = "created_at"
    fields = (
        "step_link",
        "tool",
        "call_index",
        "epoch",
        "idempotency_key",
        "llm_call_id",
        "status",
        "arguments_json",
        "approved_arguments_json",
        "result_json",
        "error",
        "decision_note",
        "created_at",
        "finished_at",
    )
    readonly_fields = (
        "step_link",
        "arguments_json",
        "approved_arguments_json",
        "result_json",
        "created_at",
    )

    @admin.display(description="Step")
    def step_link(self, call: ToolCall) -> SafeString:
        return _link("admin:runs_step_change", call.step_id, call.step)

    @admin.display(description="Arguments")
    def arguments_json(self, call: ToolCall) -> SafeString:
        return pretty_json(call.arguments)

    @admin.display(description="Approved arguments")
    def approved_arguments_json(self, call: ToolCall) -> SafeString:
        return pretty_json(call.approved_arguments)

    @admin.display(description="Result")
    def result_json(self, call: ToolCall) -> SafeString:
        return pretty_json(call.result)


@admin.register(RunEvent)
class RunEventAdmin(ViewOnlyAdmin):
    """The append-only event log: read here, never edited."""

    list_display = ("run", "seq", "kind", "created_at")
    list_filter = ("kind",)
    search_fields = ("kind", "=run__id")
    date_hierarchy = "created_at"
    fields = ("run_link", "seq", "kind", "payload_json", "created_at")
    readonly_fields = fields

    @admin.display(description="Run")
    def run_link(self, event: RunEvent) -> SafeString:
        return _link("admin:runs_run_change", event.run_id, event.run)

    @admin.display(description="Payload")
    def payload_json(self, event: RunEvent) -> SafeString:
        return pretty_json(event.payload)


@admin.register(UsageDaily)
class UsageDailyAdmin(ViewOnlyAdmin):
    """The daily sums the cost reports read; kept by the engine, recomputed by
    `manage.py rebuild_usage_rollup`, never edited."""

    list_display = (
        "day",
        "model",
        "workflow",
        "agent",
        "user",
        "call_count",
        "total_tokens",
        "cost",
    )
    list_filter = ("model", "workflow")
    list_select_related = ("workflow", "agent", "user")
    date_hierarchy = "day"


@admin.register(UsageRecord)
class UsageRecordAdmin(ViewOnlyAdmin):
    """One row per LLM call; the cost reports add these up, so they are never edited."""

    list_display = (
        "at",
        "model",
        "workflow",
        "agent",
        "user",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "cost",
        "price_source",
        "run",
    )
    list_filter = ("model", "price_source", "workflow", "agent")
    list_select_related = ("workflow", "agent", "user", "run")
    search_fields = ("model", "=run__id", "workflow__slug", "agent__name")
    date_hierarchy = "at"
    fields = (
        "run_link",
        "step",
        "epoch",
        "call_index",
        "workflow",
        "agent",
        "user",
        "model",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "total_tokens",
        "cost",
        "price",
        "price_source",
        "latency_ms",
        "at",
        "response_json",
    )
    readonly_fields = ("run_link", "response_json")

    @admin.display(description="Run")
    def run_link(self, record: UsageRecord) -> SafeString:
        return _link("admin:runs_run_change", record.run_id, record.run)

    @admin.display(description="Response")
    def response_json(self, record: UsageRecord) -> SafeString:
        return pretty_json(record.response)


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    """Prices per 1M tokens; a new row from a date on changes the price of later calls."""

    list_display = (
        "model",
        "input_per_1m",
        "output_per_1m",
        "cached_input_per_1m",
        "effective_from",
        "source",
    )
    list_filter = ("source", "effective_from")
    search_fields = ("model",)
    actions = [recompute_action]
    date_hierarchy = "effective_from"
    formfield_overrides = JSON_OVERRIDES


@admin.register(ToolHealth)
class ToolHealthAdmin(admin.ModelAdmin):
    """The circuit breaker of each tool: open means calls fail fast until `open_until`."""

    list_display = ("tool", "consecutive_failures", "is_open", "open_until", "short_error")
    list_filter = ("open_until",)
    search_fields = ("tool", "last_error")
    actions = ["close_circuit"]

    @admin.display(description="Open", boolean=True)
    def is_open(self, health: ToolHealth) -> bool:
        return health.open_until is not None and health.open_until > timezone.now()

    @admin.display(description="Last error")
    def short_error(self, health: ToolHealth) -> str:
        error = health.last_error
        return error if len(error) <= 80 else error[:79] + "…"

    @admin.action(description="Close the circuit (forget the failures)", permissions=["change"])
    def close_circuit(self, request, queryset) -> None:
        count = queryset.update(consecutive_failures=0, open_until=None, last_error="")
        self.message_user(request, f"Closed the circuit of {count} tool(s).", messages.SUCCESS)


@admin.register(Switch)
class SwitchAdmin(admin.ModelAdmin):
    list_display = ("name", "on", "changed_by", "changed_at")
    list_filter = ("on",)
    search_fields = ("name",)
    readonly_fields = ("changed_by", "changed_at")

    def save_model(self, request, obj: Switch, form, change: bool) -> None:
        obj.changed_by = request.user
        super().save_model(request, obj, form, change)


@admin.register(LookupToken)
class LookupTokenAdmin(ViewOnlyAdmin):
    """Baton replaces it on every edit of agents, roles, tools and prices (runs/models.py)."""

    list_display = ("name", "value")
