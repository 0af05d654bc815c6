import json

from django import forms
from django.db.models import F

from approvals.models import ApprovalRequest
from runs.models import Run
from teams.models import Workflow

SORTS = {"oldest": ("created_at", "id"), "newest": ("-created_at", "-id")}


class InboxFilterForm(forms.Form):
    """Filters and order of the inbox; the socket applies the same ones to live additions."""

    workflow = forms.ModelChoiceField(
        queryset=Workflow.objects.none(),
        to_field_name="slug",
        required=False,
        empty_label="All workflows",
    )
    kind = forms.ChoiceField(choices=[("", "All kinds"), *ApprovalRequest.KINDS], required=False)
    run = forms.IntegerField(required=False, min_value=1, label="Run #")
    sort = forms.ChoiceField(
        choices=[("oldest", "Oldest first"), ("newest", "Newest first"), ("due", "Due soonest")],
        required=False,
    )

    def __init__(self, user, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.user = user
        self.fields["workflow"].queryset = Workflow.objects.for_user(user).order_by("name")

    def clean_run(self):
        run_id = self.cleaned_data.get("run")
        if run_id and not Run.objects.for_user(self.user).filter(pk=run_id).exists():
            raise forms.ValidationError("No such run.")
        return run_id

    def filter(self, queryset):
        """Apply the filters and the order to `queryset`. A filter that does not validate (an
        unknown workflow, a run the user cannot see) shows nothing rather than everything."""
        self.is_valid()
        data = getattr(self, "cleaned_data", {})
        if any(name in self.errors for name in ("workflow", "kind", "run")):
            return queryset.none()
        if data.get("workflow"):
            queryset = queryset.filter(run__workflow=data["workflow"])
        if data.get("kind"):
            queryset = queryset.filter(kind=data["kind"])
        if data.get("run"):
            queryset = queryset.filter(run_id=data["run"])
        sort = data.get("sort") or "oldest"
        if sort == "due":
            # Requests without a deadline come last: they can wait.
            return queryset.order_by(F("due_at").asc(nulls_last=True), "created_at", "id")
        return queryset.order_by(*SORTS[sort])


def _not_json(token: str):
    raise ValueError(f"{token} is not JSON")


def _finite(number: str) -> float:
    value = float(number)
    return _not_json(number) if value in (float("inf"), float("-inf")) else value


class DecisionForm(forms.Form):
    decision = forms.ChoiceField(choices=[("approve", "Approve"), ("reject", "Reject")])
    comment = forms.CharField(required=False, max_length=5000, strip=True)
    edited = forms.CharField(required=False, widget=forms.Textarea, strip=True, label="Edited JSON")

    def clean_edited(self):
        text = self.cleaned_data.get("edited") or ""
        if not text:
            return None
        try:
            # NaN and Infinity: Python reads them, no database's JSON column stores them.
            return {"value": json.loads(text, parse_constant=_not_json, parse_float=_finite)}
        except ValueError as exc:  # JSONDecodeError is a ValueError
            raise forms.ValidationError(f"Not valid JSON: {exc}") from exc
        except RecursionError:
            raise forms.ValidationError("This JSON is nested too deeply.") from None

    def clean(self):
        cleaned = super().clean()
        if cleaned.get("decision") == "reject":
            if not cleaned.get("comment"):
                self.add_error("comment", "A rejection needs a reason.")
            if cleaned.get("edited") is not None:
                # Rejecting ignores any edit in the same card; only approving carries one.
                cleaned["edited"] = None
        return cleaned


class BulkDecisionForm(forms.Form):
    decision = forms.ChoiceField(choices=[("approve", "Approve"), ("reject", "Reject")])
    comment = forms.CharField(required=False, max_length=5000, strip=True)
    ids = forms.CharField(required=False)

    def __init__(self, *args, ids: list[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.raw_ids = ids or []

    def clean(self):
        cleaned = super().clean()
        try:
            ids = sorted({int(value) for value in self.raw_ids})
        except ValueError:
            raise forms.ValidationError("Bad request ids.") from None
        if not ids:
            raise forms.ValidationError("Select at least one request.")
        cleaned["ids"] = ids
        if cleaned.get("decision") == "reject" and not cleaned.get("comment"):
            self.add_error("comment", "A rejection needs a reason.")
        return cleaned
