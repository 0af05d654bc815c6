"""The configuration UI: roles, tools, agents and workflows (and the shared admin helpers)."""

import json

import jsonschema
from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Count, Max
from django.urls import reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString

from teams.models import Agent, OutboxMessage, Role, Tool, Workflow, WorkflowVersion
from teams.spec import NODE_KINDS, upgrade_spec, validate_spec

admin.site.site_header = "Baton administration"
admin.site.site_title = "Baton admin"
admin.site.index_title = "Configuration"


class PrettyJSONField(forms.JSONField):
    """A JSON form field that shows its value indented, so a spec is readable in a textarea."""

    def prepare_value(self, value):
        if isinstance(value, forms.fields.InvalidJSONInput):
            return value
        return json.dumps(value, indent=2, ensure_ascii=False, cls=self.encoder)


def json_textarea(rows: int = 10) -> forms.Textarea:
    return forms.Textarea(
        attrs={
            "rows": rows,
            "spellcheck": "false",
            "style": "font-family: ui-monospace, Menlo, Consolas, monospace; width: 95%;",
        }
    )


JSON_OVERRIDES = {models.JSONField: {"form_class": PrettyJSONField, "widget": json_textarea()}}


def pretty_json(value) -> SafeString:
    """Read-only display of a JSON value; escaped, because it may hold agent output."""
    text = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False, default=str)
    return format_html('<pre style="white-space: pre-wrap; margin: 0">{}</pre>', text)


class ViewOnlyAdmin(admin.ModelAdmin):
    """Rows Baton writes itself (history, logs, side-effect records): viewable here, never added
    or edited, since an edit would falsify the record.

    They are never deleted one by one either, but deleting the row they belong to (a run, a
    workflow) still cascades to them: the admin asks every related ModelAdmin for delete
    permission, so refusing it unconditionally would make runs undeletable.
    """

    formfield_overrides = JSON_OVERRIDES

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        match = request.resolver_match
        own_views = f"{self.opts.app_label}_{self.opts.model_name}_"
        if match is None or (match.url_name or "").startswith(own_views):
            return False
        return super().has_delete_permission(request, obj)


def known_names(extra_workflows: set[str] = frozenset()) -> dict[str, set[str]]:
    """The names a spec may refer to, in the keyword arguments validate_spec takes."""
    return {
        "known_agents": set(Agent.objects.values_list("name", flat=True)),
        "known_tools": set(Tool.objects.values_list("name", flat=True)),
        "known_workflows": set(Workflow.objects.values_list("slug", flat=True))
        | set(extra_workflows),
    }


# --- roles, tools, agents -------------------------------------------------------------------


class AgentOfRoleInline(admin.TabularInline):
    model = Agent
    fields = ("name", "model", "temperature", "max_tokens")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True
    verbose_name_plural = "Agents with this role"

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Role)
class RoleAdmin(admin.ModelAdmin):
    list_display = ("name", "goal", "agent_count")
    search_fields = ("name", "goal", "backstory")
    inlines = [AgentOfRoleInline]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(agent_total=Count("agents"))

    @admin.display(description="Agents", ordering="agent_total")
    def agent_count(self, role: Role) -> int:
        return role.agent_total


class ToolAdminForm(forms.ModelForm):
    class Meta:
        model = Tool
        fields = (
            "name",
            "description",
            "entrypoint",
            "args_schema",
            "side_effect",
            "requires_approval",
            "approver_group",
        )
        field_classes = {"args_schema": PrettyJSONField}
        widgets = {"args_schema": json_textarea(12)}

    def clean_args_schema(self):
        schema = self.cleaned_data["args_schema"]
        if isinstance(schema, dict):
            try:
                jsonschema.Draft202012Validator.check_schema(schema)
            except jsonschema.SchemaError as exc:
                raise ValidationError(f"Not a valid JSON schema: {exc.message}") from exc
        return schema


@admin.register(Tool)
class ToolAdmin(admin.ModelAdmin):
    form = ToolAdminForm
    list_display = (
        "name",
        "entrypoint",
        "side_effect",
        "requires_approval",
        "approver_group",
        "agent_count",
    )
    list_filter = ("side_effect", "requires_approval", "entrypoint")
    search_fields = ("name", "description", "entrypoint")

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(agent_total=Count("agents"))

    @admin.display(description="Agents", ordering="agent_total")
    def agent_count(self, tool: Tool) -> int:
        return tool.agent_total


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin):
    list_display = ("name", "role", "model", "temperature", "max_tokens", "tool_names")
    list_filter = ("role", "model", "tools")
    list_select_related = ("role",)
    search_fields = ("name", "model", "system_prompt", "role__name")
    filter_horizontal = ("tools",)
    formfield_overrides = JSON_OVERRIDES
    fieldsets = [
        (None, {"fields": ("name", "role", "system_prompt", "tools")}),
        (
            "Model",
            {"fields": ("model", "fallback_models", "api_base", "temperature", "max_tokens")},
        ),
        ("Limits", {"fields": ("max_retries", "timeout_s", "max_tool_rounds")}),
    ]

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("tools")

    @admin.display(description="Tools")
    def tool_names(self, agent: Agent) -> str:
        return ", ".join(tool.name for tool in agent.tools.all()) or "—"


@admin.register(OutboxMessage)
class OutboxMessageAdmin(ViewOnlyAdmin):
    """What the side-effect tools sent. Deleting a row would let its idempotency key act again."""

    list_display = ("created_at", "tool", "idempotency_key")
    list_filter = ("tool",)
    search_fields = ("idempotency_key", "tool")
    date_hierarchy = "created_at"
    fields = ("tool", "idempotency_key", "created_at", "payload_json", "result_json")
    readonly_fields = fields

    @admin.display(description="Payload")
    def payload_json(self, message: OutboxMessage) -> SafeString:
        return pretty_json(message.payload)

    @admin.display(description="Result")
    def result_json(self, message: OutboxMessage) -> SafeString:
        return pretty_json(message.result)


# --- workflows ------------------------------------------------------------------------------

SPEC_HELP = (
    "The workflow spec as JSON: nodes, edges, input_schema (and optionally state_schema and "
    f"entry). Node kinds: {', '.join(NODE_KINDS)}. The format is documented at the top of "
    "teams/spec.py. Saving refuses a spec with problems; publish it with the "
    "“Publish draft as new version” action."
)


class WorkflowAdminForm(forms.ModelForm):
    class Meta:
        model = Workflow
        fields = (
            "name",
            "slug",
            "description",
            "owner",
            "members",
            "approver_group",
            "draft",
            "max_cost_per_run",
            "max_tokens_per_run",
            "max_tokens_per_step",
            "max_steps_per_run",
            "max_wall_s",
            "daily_cost_cap",
            "monthly_cost_cap",
            "budget_policy",
            "layout",
        )
        field_classes = {"draft": PrettyJSONField, "layout": PrettyJSONField}
        widgets = {"draft": json_textarea(30), "layout": json_textarea(6)}
        help_texts = {"draft": SPEC_HELP}

    def clean_draft(self):
        # A spec pasted in the old format is stored in the current one.
        return upgrade_spec(self.cleaned_data["draft"])

    def clean(self):
        """Report the spec's references to agents, tools or workflows that do not exist.

        Workflow.clean (run by the model validation after this) reports the spec's own
        problems; only what needs the database is checked here, so nothing is listed twice.
        """
        cleaned = super().clean()
        draft = cleaned.get("draft")
        if draft is None:
            return cleaned
        own_problems = set(validate_spec(draft))
        names = known_names({cleaned["slug"]} if cleaned.get("slug") else set())
        references = [p for p in validate_spec(draft, **names) if p not in own_problems]
        if references:
            # add_error drops the draft from cleaned_data; keep it on the instance so the model
            # validation checks the spec that was typed, not the one saved before.
            self.instance.draft = draft
            self.add_error("draft", [str(p) for p in references])
        return cleaned


class WorkflowVersionInline(admin.TabularInline):
    model = WorkflowVersion
    fields = ("number", "note", "schema_version", "created_by", "created_at")
    readonly_fields = fields
    ordering = ("-number",)
    extra = 0
    can_delete = False
    show_change_link = True
    verbose_name_plural = "Published versions (immutable)"

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Workflow)
class WorkflowAdmin(admin.ModelAdmin):
    form = WorkflowAdminForm
    list_display = (
        "name",
        "slug",
        "owner",
        "latest_version_number",
        "draft_status",
        "max_cost_per_run",
        "updated_at",
    )
    list_filter = ("budget_policy", "owner", "created_at")
    list_select_related = ("owner",)
    search_fields = ("name", "slug", "description")
    prepopulated_fields = {"slug": ("name",)}
    filter_horizontal = ("members",)
    inlines = [WorkflowVersionInline]
    actions = ["publish_draft"]
    fieldsets = [
        (None, {"fields": ("name", "slug", "description", "owner", "members", "approver_group")}),
        ("Draft spec", {"fields": ("draft",)}),
        (
            "Budgets",
            {
                "fields": (
                    "max_cost_per_run",
                    "max_tokens_per_run",
                    "max_tokens_per_step",
                    "max_steps_per_run",
                    "max_wall_s",
                    "daily_cost_cap",
                    "monthly_cost_cap",
                    "budget_policy",
                )
            },
        ),
        ("Editor layout", {"fields": ("layout",), "classes": ("collapse",)}),
    ]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(latest_number=Max("versions__number"))

    def get_changeform_initial_data(self, request) -> dict:
        # A starting point that shows the shape; it is refused until it has a node.
        return {
            "draft": {
                "input_schema": {
                    "type": "object",
                    "properties": {"topic": {"type": "string"}},
                    "required": ["topic"],
                },
                "nodes": [],
                "edges": [],
            },
            **super().get_changeform_initial_data(request),
        }

    @admin.display(description="Published", ordering="latest_number")
    def latest_version_number(self, workflow: Workflow) -> str:
        return f"v{workflow.latest_number}" if workflow.latest_number else "—"

    @admin.display(description="Draft")
    def draft_status(self, workflow: Workflow) -> str:
        latest = workflow.latest_version()
        if latest is None:
            return "never published"
        if latest.get_spec() != upgrade_spec(workflow.draft):
            return "unpublished changes"
        return "published"

    @admin.action(description="Publish draft as new version", permissions=["change"])
    def publish_draft(self, request, queryset) -> None:
        names = known_names()
        for workflow in queryset:
            spec = upgrade_spec(workflow.draft)
            problems = validate_spec(spec, **names)
            if problems:
                self.message_user(
                    request,
                    f"{workflow}: not published. " + "; ".join(str(p) for p in problems),
                    messages.ERROR,
                )
                continue
            latest = workflow.latest_version()
            if latest is not None and latest.get_spec() == spec:
                self.message_user(
                    request,
                    f"{workflow}: the draft is already published as v{latest.number}.",
                    messages.WARNING,
                )
                continue
            version = workflow.publish(user=request.user, note="Published from the admin")
            self.message_user(
                request, f"{workflow}: published v{version.number}.", messages.SUCCESS
            )


@admin.register(WorkflowVersion)
class WorkflowVersionAdmin(ViewOnlyAdmin):
    list_display = (
        "__str__",
        "workflow",
        "number",
        "schema_version",
        "note",
        "created_by",
        "created_at",
    )
    list_filter = ("workflow", "schema_version")
    list_select_related = ("workflow", "created_by")
    search_fields = ("workflow__name", "workflow__slug", "note")
    date_hierarchy = "created_at"
    fields = (
        "workflow_link",
        "number",
        "schema_version",
        "note",
        "created_by",
        "created_at",
        "spec_json",
        "layout_json",
    )
    readonly_fields = fields

    @admin.display(description="Workflow")
    def workflow_link(self, version: WorkflowVersion) -> SafeString:
        url = reverse("admin:teams_workflow_change", args=[version.workflow_id])
        return format_html('<a href="{}">{}</a>', url, version.workflow)

    @admin.display(description="Spec")
    def spec_json(self, version: WorkflowVersion) -> SafeString:
        return pretty_json(version.spec)

    @admin.display(description="Layout")
    def layout_json(self, version: WorkflowVersion) -> SafeString:
        return pretty_json(version.layout)
