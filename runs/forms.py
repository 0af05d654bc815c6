"""Forms of the run pages: the list's filters, the start form built from a version's input
schema, and the fork form."""

import json
from datetime import date, datetime, time, timedelta

from django import forms
from django.contrib.auth import get_user_model
from django.db.models import Q
from django.utils import timezone

from runs.models import Run
from teams.models import Workflow


class JSONField(forms.JSONField):
    """Django's JSONField, with JSON nested too deeply for Python a form error, not a crash."""

    def to_python(self, value):
        try:
            return super().to_python(value)
        except RecursionError as exc:
            raise forms.ValidationError("Not usable JSON: nested too deeply.") from exc

    def bound_data(self, data, initial):
        try:
            return super().bound_data(data, initial)
        except RecursionError:
            return forms.fields.InvalidJSONInput(data)

    def has_changed(self, initial, data):
        try:
            return super().has_changed(initial, data)
        except RecursionError:
            return True


# Strings longer than this (by their schema's maxLength) get a textarea.
LONG_STRING = 200


class RunFilterForm(forms.Form):
    """Filters of the runs list; the list view and the list's socket apply the same `filter`."""

    q = forms.CharField(
        required=False,
        max_length=100,
        label="Search",
        widget=forms.TextInput(attrs={"type": "search", "placeholder": "Run #, workflow or user"}),
    )
    status = forms.ChoiceField(required=False, choices=[("", "Any status"), *Run.STATUSES])
    workflow = forms.ModelChoiceField(
        queryset=Workflow.objects.none(),
        required=False,
        to_field_name="slug",
        empty_label="Any workflow",
    )
    started_from = forms.DateField(
        required=False, label="From", widget=forms.DateInput(attrs={"type": "date"})
    )
    started_to = forms.DateField(
        required=False, label="To", widget=forms.DateInput(attrs={"type": "date"})
    )

    def __init__(self, *args, user, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["workflow"].queryset = Workflow.objects.for_user(user).order_by("name")

    def filter(self, runs):
        """Narrow `runs` (already scoped to the user) using only indexed columns of Run."""
        if not self.is_valid():
            return runs
        data = self.cleaned_data
        if data["status"]:
            runs = runs.filter(status=data["status"])
        if data["workflow"]:
            runs = runs.filter(workflow=data["workflow"])
        if data["started_from"]:
            runs = runs.filter(created_at__gte=_day_start(data["started_from"]))
        # 9999-12-31 has no next day: that filter would be "everything" anyway.
        if data["started_to"] and data["started_to"] < date.max:
            runs = runs.filter(created_at__lt=_day_start(data["started_to"] + timedelta(days=1)))
        if data["q"]:
            runs = runs.filter(self._search(data["q"].strip()))
        return runs

    def _search(self, text: str) -> Q:
        """Match a run number, a workflow's name or slug, or a user name. Workflows and users
        are looked up first (small tables), so the runs query stays on indexed foreign keys."""
        number = text.lstrip("#")
        query = Q(pk=int(number)) if number.isascii() and number.isdigit() else Q(pk__in=[])
        workflows = Workflow.objects.filter(Q(name__icontains=text) | Q(slug__icontains=text))
        users = get_user_model().objects.filter(username__icontains=text)
        return (
            query
            | Q(workflow__in=list(workflows.values_list("pk", flat=True)[:500]))
            | Q(started_by__in=list(users.values_list("pk", flat=True)[:500]))
        )


def _day_start(day) -> datetime:
    return timezone.make_aware(datetime.combine(day, time.min))


class StartRunForm(forms.Form):
    """One field per property of the version's input schema (JSON schema)."""

    def __init__(self, *args, schema: dict, **kwargs):
        super().__init__(*args, **kwargs)
        schema = schema if isinstance(schema, dict) else {}
        required = set(schema.get("required") or [])
        properties = schema.get("properties") or {}
        for name, prop in properties.items():
            if isinstance(prop, dict):
                self.fields[name] = schema_field(name, prop, name in required)

    def run_input(self) -> dict:
        """The cleaned values as the run's input; optional fields left empty are left out."""
        values = {}
        for name, value in self.cleaned_data.items():
            if value is None or value == "":
                continue
            values[name] = value
        return values

    def add_input_errors(self, messages: list[str]) -> None:
        """Put the engine's messages ("topic: 'topic' is a required property") on their fields."""
        for message in messages:
            name, sep, text = message.partition(": ")
            if sep and name in self.fields:
                self.add_error(name, text)
            else:
                self.add_error(None, message)


def schema_field(name: str, prop: dict, required: bool) -> forms.Field:
    kind = prop.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    common = {
        "required": required,
        "label": prop.get("title") or name.replace("_", " ").capitalize(),
        "help_text": prop.get("description", ""),
        "initial": prop.get("default"),
    }
    if isinstance(prop.get("enum"), list):
        # Text choices travel as themselves; other values (numbers, null...) as JSON.
        plain = all(isinstance(v, str) for v in prop["enum"])
        encode = str if plain else json.dumps
        choices = [("", "Choose…"), *((encode(v), str(v)) for v in prop["enum"])]
        return forms.TypedChoiceField(
            choices=choices,
            coerce=str if plain else json.loads,
            empty_value=None,
            **{**common, "initial": encode(prop["default"]) if "default" in prop else None},
        )
    if kind == "boolean":
        return forms.BooleanField(**{**common, "required": False})
    if kind == "integer":
        return forms.IntegerField(
            min_value=prop.get("minimum"), max_value=prop.get("maximum"), **common
        )
    if kind == "number":
        return forms.FloatField(
            min_value=prop.get("minimum"), max_value=prop.get("maximum"), **common
        )
    if kind == "string":
        max_length = prop.get("maxLength")
        long = (max_length or 0) > LONG_STRING or prop.get("format") in ("textarea", "markdown")
        widget = forms.Textarea(attrs={"rows": 5}) if long else forms.TextInput()
        return forms.CharField(
            max_length=max_length,
            min_length=prop.get("minLength"),
            widget=widget,
            strip=False,
            **common,
        )
    # Objects, arrays and untyped values are edited as JSON.
    return JSONField(widget=forms.Textarea(attrs={"rows": 5, "class": "mono"}), **common)


class ForkForm(forms.Form):
    """Fork a run from one of its steps, optionally with a new input, prompt or model."""

    input = JSONField(
        widget=forms.Textarea(attrs={"rows": 8, "class": "mono"}),
        help_text="The new run's input (JSON).",
    )
    prompt = forms.CharField(
        required=False,
        strip=False,
        widget=forms.Textarea(attrs={"rows": 8, "class": "mono"}),
        help_text="This node's prompt template for the new run.",
    )
    model = forms.CharField(
        required=False, max_length=200, help_text="A LiteLLM model string for this node's agent."
    )

    def clean_input(self):
        value = self.cleaned_data["input"]
        if not isinstance(value, dict):
            raise forms.ValidationError("The input must be a JSON object.")
        return value

    def overrides(self, node_id: str) -> dict:
        """Only what the user changed becomes an override of the node."""
        changed = {
            key: self.cleaned_data[key]
            for key in ("prompt", "model")
            if key in self.changed_data and self.cleaned_data[key]
        }
        return {node_id: changed} if changed else {}
