"""Pages for bringing workflows in and out: YAML import/export and the templates gallery."""

from django import forms
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.defaultfilters import filesizeformat
from django.urls import reverse
from django.views.decorators.http import require_http_methods, require_POST

from teams import gallery as patterns
from teams.crewai import import_crewai
from teams.models import Workflow
from teams.yaml_io import (
    MAX_IMPORT_BYTES,
    ImportFailed,
    ImportResult,
    export_workflow,
    import_yaml,
    unique_slug,
)


def editor_url(workflow: Workflow) -> str:
    return reverse("teams:editor", kwargs={"slug": workflow.slug})


def _read(upload) -> bytes:
    # One byte past the limit is enough for load_yaml to refuse the file with its size.
    return upload.read(MAX_IMPORT_BYTES + 1)


class ImportForm(forms.Form):
    file = forms.FileField(
        required=False,
        label="Export file",
        help_text="A .yaml file exported from Baton (it starts with baton_export).",
    )
    agents_file = forms.FileField(required=False, label="CrewAI agents.yaml")
    tasks_file = forms.FileField(required=False, label="CrewAI tasks.yaml")
    hierarchical = forms.BooleanField(
        required=False,
        label="Hierarchical process",
        help_text="A manager delegates the tasks to the agents (CrewAI process: hierarchical). "
        "Unchecked, the tasks run one after another.",
    )
    name = forms.CharField(
        required=False,
        max_length=200,
        label="Workflow name",
        help_text="For a CrewAI import; the slug is made from it.",
    )

    def clean(self):
        data = super().clean()
        native = data.get("file")
        crew = data.get("agents_file"), data.get("tasks_file")
        if native and any(crew):
            raise ValidationError("Upload either a Baton export or a CrewAI pair, not both.")
        if not native and not all(crew):
            if any(crew):
                raise ValidationError("A CrewAI import needs both agents.yaml and tasks.yaml.")
            raise ValidationError("Choose a file to import.")
        return data


def _import(form: ImportForm, user) -> ImportResult:
    data = form.cleaned_data
    if data.get("file"):
        # Only staff may change shared roles, agents and tools or add tools.
        return import_yaml(_read(data["file"]), owner=user, trusted=user.is_staff)
    return import_crewai(
        _read(data["agents_file"]),
        _read(data["tasks_file"]),
        hierarchical=True if data["hierarchical"] else None,
        owner=user,
        name=data.get("name") or "",
    )


@require_http_methods(["GET", "POST"])
def import_workflow_view(request: HttpRequest) -> HttpResponse:
    posted = request.method == "POST"
    form = ImportForm(request.POST, request.FILES) if posted else ImportForm()
    result = None
    if posted and form.is_valid():
        try:
            result = _import(form, request.user)
        except ImportFailed as exc:
            form.add_error(None, str(exc))
        else:
            if not result.problems:
                messages.success(request, f"Imported {result.workflow.name}.")
                return redirect(editor_url(result.workflow))
    status = 400 if form.errors else 200
    return render(
        request,
        "teams/import.html",
        {
            "form": form,
            "result": result,
            "editor_url": editor_url(result.workflow) if result else None,
            "max_size": filesizeformat(MAX_IMPORT_BYTES),
        },
        status=status,
    )


def export_workflow_view(request: HttpRequest, slug: str) -> HttpResponse:
    workflow = get_object_or_404(Workflow.objects.for_user(request.user), slug=slug)
    response = HttpResponse(
        export_workflow(workflow), content_type="application/yaml; charset=utf-8"
    )
    response["Content-Disposition"] = f'attachment; filename="{workflow.slug}.yaml"'
    return response


class TemplateForm(forms.Form):
    name = forms.CharField(max_length=200)
    slug = forms.SlugField(
        max_length=120, required=False, help_text="Left blank, it is made from the name."
    )

    def clean(self):
        data = super().clean()
        if data.get("slug"):
            try:
                patterns.check_slug(data["slug"])
            except ValidationError as exc:
                self.add_error("slug", exc)
        elif data.get("name"):
            # Left blank: a free slug made from the name, so "Use this template" just works.
            data["slug"] = unique_slug(data["name"])
        return data


def _cards(bound: TemplateForm | None = None, bound_key: str | None = None) -> list[dict]:
    cards = []
    for key, template in patterns.TEMPLATES.items():
        form = (
            bound
            if key == bound_key
            else TemplateForm(prefix=key, initial={"name": template.title})
        )
        kinds = []
        for node in template.spec(
            {k: k for k in template.agents}, {local: local for local, _ in template.children}
        )["nodes"]:
            if node["kind"] not in kinds:
                kinds.append(node["kind"])
        cards.append({"template": template, "form": form, "kinds": kinds})
    return cards


def gallery(request: HttpRequest) -> HttpResponse:
    return render(request, "teams/gallery.html", {"cards": _cards()})


@require_POST
def create_from_template(request: HttpRequest, key: str) -> HttpResponse:
    if key not in patterns.TEMPLATES:
        raise Http404("No such template.")
    form = TemplateForm(request.POST, prefix=key)
    if form.is_valid():
        try:
            workflow = patterns.create_from_template(
                key,
                name=form.cleaned_data["name"],
                slug=form.cleaned_data["slug"],
                owner=request.user,
            )
        except ValidationError as exc:  # the slug was taken between the check and the insert
            form.add_error("slug", exc)
        else:
            messages.success(request, f"Created {workflow.name} from a template.")
            return redirect(editor_url(workflow))
    return render(request, "teams/gallery.html", {"cards": _cards(form, key)}, status=400)
