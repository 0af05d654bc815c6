"""Design: who the agents are, what they may call, and the workflows that connect them."""

import copy

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models, transaction
from django.db.models import Max, Q

from teams import tools as tool_registry
from teams.spec import SCHEMA_VERSION, upgrade_spec, validate_spec


class Role(models.Model):
    """CrewAI's vocabulary: what an agent is for."""

    name = models.CharField(max_length=120, unique=True)
    goal = models.TextField()
    backstory = models.TextField(blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Tool(models.Model):
    """A callable an agent may use. `entrypoint` names a function in the code's registry;
    code is never stored in or evaluated from the database."""

    name = models.CharField(max_length=120, unique=True)
    description = models.TextField()
    args_schema = models.JSONField(default=dict, blank=True)
    entrypoint = models.CharField(max_length=200, choices=tool_registry.choices)
    side_effect = models.BooleanField(
        default=False, help_text="Changes the world; gets an idempotency key, never runs twice."
    )
    requires_approval = models.BooleanField(
        default=False, help_text="A human approves each call, with its arguments, before it runs."
    )
    approver_group = models.ForeignKey(
        "auth.Group", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self):
        if self.entrypoint not in tool_registry.REGISTRY:
            raise ValidationError({"entrypoint": f"Unknown tool entrypoint {self.entrypoint!r}"})
        if not isinstance(self.args_schema, dict):
            raise ValidationError({"args_schema": "Must be a JSON object (a JSON schema)."})

    def as_function(self) -> dict:
        """The OpenAI function-calling description offered to the LLM. The schema is a copy:
        steps share a process's Tool instances (runs/rows.py `kept`), and a provider adapter
        may adjust the schema it is handed."""
        schema = copy.deepcopy(self.args_schema) or {"type": "object", "properties": {}}
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": schema},
        }


class Agent(models.Model):
    name = models.CharField(max_length=120, unique=True)
    role = models.ForeignKey(Role, on_delete=models.PROTECT, related_name="agents")
    model = models.CharField(
        max_length=200,
        default="scripted/baton",
        help_text="A LiteLLM model string: openai/gpt-4o-mini, anthropic/..., ollama/..., "
        "scripted/...",
    )
    fallback_models = models.JSONField(
        default=list, blank=True, help_text="Models tried in order when this one keeps failing."
    )
    api_base = models.CharField(
        max_length=300, blank=True, help_text="For OpenAI-compatible servers (vLLM, Ollama...)."
    )
    temperature = models.FloatField(default=0.2)
    max_tokens = models.PositiveIntegerField(default=1024)
    system_prompt = models.TextField(blank=True)
    tools = models.ManyToManyField(Tool, blank=True, related_name="agents")
    max_retries = models.PositiveSmallIntegerField(default=3)
    timeout_s = models.PositiveIntegerField(default=120)
    max_tool_rounds = models.PositiveSmallIntegerField(default=8)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self):
        if not isinstance(self.fallback_models, list) or not all(
            isinstance(m, str) for m in self.fallback_models
        ):
            raise ValidationError({"fallback_models": "Must be a JSON list of model strings."})


class OutboxMessage(models.Model):
    """What the demo side-effect tools 'send'. The unique idempotency key is what makes a
    side-effect tool run at most once per intended call, even across worker crashes."""

    idempotency_key = models.CharField(max_length=200, unique=True)
    tool = models.CharField(max_length=120)
    payload = models.JSONField(default=dict)
    result = models.JSONField(default=dict)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.tool} ({self.idempotency_key})"


class WorkflowQuerySet(models.QuerySet):
    def for_user(self, user) -> "WorkflowQuerySet":
        """Staff see every workflow; others see the ones they own or are a member of."""
        if not user.is_authenticated:
            return self.none()
        if user.is_staff:
            return self.all()
        return self.filter(Q(owner=user) | Q(members=user)).distinct()


BUDGET_POLICIES = [("stop", "Stop the run"), ("ask", "Pause and ask to raise it")]


class Workflow(models.Model):
    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=120, unique=True)
    description = models.TextField(blank=True)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="owned_workflows",
    )
    members = models.ManyToManyField(
        settings.AUTH_USER_MODEL,
        blank=True,
        related_name="workflows",
        help_text="Users who may see, run and edit this workflow besides its owner.",
    )
    draft = models.JSONField(default=dict, blank=True)
    # Node positions live apart from the spec, so moving a node never changes behaviour.
    layout = models.JSONField(default=dict, blank=True)
    # Budgets. Blank means unlimited.
    max_cost_per_run = models.DecimalField(max_digits=12, decimal_places=6, null=True, blank=True)
    max_tokens_per_run = models.PositiveIntegerField(null=True, blank=True)
    max_tokens_per_step = models.PositiveIntegerField(null=True, blank=True)
    max_steps_per_run = models.PositiveIntegerField(default=200)
    max_wall_s = models.PositiveIntegerField(default=3600, help_text="Run wall-clock limit.")
    daily_cost_cap = models.DecimalField(max_digits=12, decimal_places=6, null=True, blank=True)
    monthly_cost_cap = models.DecimalField(max_digits=12, decimal_places=6, null=True, blank=True)
    budget_policy = models.CharField(max_length=8, choices=BUDGET_POLICIES, default="stop")
    approver_group = models.ForeignKey(
        "auth.Group",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="Only members of this group (and superusers) decide this workflow's approvals.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = WorkflowQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self):
        problems = validate_spec(self.draft)
        if problems:
            raise ValidationError({"draft": [str(p) for p in problems]})

    def run_budget(self) -> dict:
        """The per-run limits a new run starts with (overridable at start)."""
        return {
            "max_cost": str(self.max_cost_per_run) if self.max_cost_per_run is not None else None,
            "max_tokens": self.max_tokens_per_run,
            "max_step_tokens": self.max_tokens_per_step,
            "max_steps": self.max_steps_per_run,
            "max_wall_s": self.max_wall_s,
            "policy": self.budget_policy,
        }

    def latest_version(self) -> "WorkflowVersion | None":
        return self.versions.order_by("-number").first()

    def publish(
        self, user=None, note: str = "", spec: dict | None = None, layout: dict | None = None
    ) -> "WorkflowVersion":
        """Freeze the draft (or the given spec) as the next immutable version.

        Raises ValidationError with every problem when the spec is invalid.
        """
        spec = upgrade_spec(self.draft if spec is None else spec)
        problems = validate_spec(spec)
        if problems:
            raise ValidationError([str(p) for p in problems])
        with transaction.atomic():
            # Lock the workflow row so two publishes never take the same number.
            Workflow.objects.select_for_update().filter(pk=self.pk).first()
            number = (self.versions.aggregate(n=Max("number"))["n"] or 0) + 1
            return WorkflowVersion.objects.create(
                workflow=self,
                number=number,
                spec=spec,
                layout=self.layout if layout is None else layout,
                schema_version=SCHEMA_VERSION,
                note=note,
                created_by=user if user and user.is_authenticated else None,
            )


class WorkflowVersion(models.Model):
    """An immutable published snapshot. Runs always point at one of these, never at a draft."""

    workflow = models.ForeignKey(Workflow, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    spec = models.JSONField()
    layout = models.JSONField(default=dict, blank=True)
    schema_version = models.PositiveSmallIntegerField(default=SCHEMA_VERSION)
    note = models.CharField(max_length=500, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["workflow", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["workflow", "number"], name="unique_version_number")
        ]

    def __str__(self) -> str:
        return f"{self.workflow.slug} v{self.number}"

    def save(self, *args, **kwargs):
        if self.pk is not None and WorkflowVersion.objects.filter(pk=self.pk).exists():
            raise ValidationError("A published workflow version is immutable.")
        super().save(*args, **kwargs)

    def get_spec(self) -> dict:
        """The spec in the current schema version (older versions are upgraded on load)."""
        return upgrade_spec(self.spec, from_version=self.schema_version)
