"""Import a workflow from a Baton export or a CrewAI project.

    manage.py import_workflow export.yaml [--replace]
    manage.py import_workflow path/to/crewai-project/        # finds agents.yaml + tasks.yaml
    manage.py import_workflow agents.yaml --crewai-tasks tasks.yaml [--hierarchical]

Prints what was created and every problem. Bad input exits with status 2 and one line.
"""

from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from teams.crewai import import_crewai_documents, looks_like_agents, looks_like_tasks
from teams.yaml_io import MAX_IMPORT_BYTES, ImportFailed, ImportResult, import_document, is_native
from teams.yaml_io import load_yaml as parse

_SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "__pycache__"}


def _fail(message: str) -> CommandError:
    return CommandError(message, returncode=2)


def _read(path: Path, what: str) -> object:
    if not path.is_file():
        raise _fail(f"{what} {path} does not exist or is not a file.")
    with path.open("rb") as f:
        return parse(f.read(MAX_IMPORT_BYTES + 1), f"{what} {path}")


def _first(folder: Path, stem: str) -> Path | None:
    for suffix in (".yaml", ".yml"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def find_crewai_config(root: Path) -> Path:
    """The folder holding agents.yaml and tasks.yaml: the root, its config/, or the one folder
    below it that has both (CrewAI projects keep them in src/<project>/config/)."""
    for folder in (root, root / "config"):
        if _first(folder, "agents") and _first(folder, "tasks"):
            return folder
    found = []
    for agents in [*root.rglob("agents.yaml"), *root.rglob("agents.yml")]:
        if _SKIP_DIRS & set(agents.relative_to(root).parts):
            continue
        if _first(agents.parent, "tasks"):
            found.append(agents.parent)
    if len(found) == 1:
        return found[0]
    if not found:
        raise _fail(f"{root} holds no agents.yaml with a tasks.yaml beside it.")
    raise _fail(
        f"{root} holds several CrewAI configs; pass one folder: " + ", ".join(str(f) for f in found)
    )


class Command(BaseCommand):
    help = "Import a workflow from a Baton YAML export or a CrewAI project (agents + tasks)."

    def add_arguments(self, parser):
        parser.add_argument(
            "path", help="A Baton export, a CrewAI agents.yaml, or a CrewAI project folder."
        )
        parser.add_argument(
            "--crewai-tasks",
            metavar="PATH",
            help="The CrewAI tasks.yaml that goes with the agents.yaml in PATH.",
        )
        parser.add_argument(
            "--crewai-crew",
            metavar="PATH",
            help="An optional CrewAI crew spec (process, manager_llm, manager_agent).",
        )
        parser.add_argument(
            "--hierarchical",
            action="store_true",
            help="Import a CrewAI crew as hierarchical (a manager delegates).",
        )
        parser.add_argument("--name", default="", help="The workflow's name (CrewAI imports).")
        parser.add_argument("--owner", metavar="USERNAME", help="The user who owns the workflow.")
        parser.add_argument(
            "--replace",
            action="store_true",
            help="Replace the workflow with the same slug instead of importing "
            "under a new slug (Baton exports).",
        )

    def handle(
        self,
        *args,
        path: str,
        crewai_tasks: str | None,
        crewai_crew: str | None,
        hierarchical: bool,
        name: str,
        owner: str | None,
        replace: bool,
        **options,
    ):
        user = None
        if owner:
            user = get_user_model().objects.filter(username=owner).first()
            if user is None:
                raise _fail(f"No user named {owner!r}.")
        try:
            result = self._import(
                Path(path), crewai_tasks, crewai_crew, hierarchical, name, user, replace
            )
        except ImportFailed as exc:
            raise _fail(str(exc)) from None
        self._report(result)

    def _import(
        self, path: Path, tasks_path, crew_path, hierarchical: bool, name: str, user, replace: bool
    ) -> ImportResult:
        flags = {"hierarchical": True if hierarchical else None, "owner": user}
        crew = _read(Path(crew_path), "Crew file") if crew_path else None
        if path.is_dir():
            folder = find_crewai_config(path)
            if crew is None and _first(folder, "crew"):
                crew = _read(_first(folder, "crew"), "Crew file")
            project = path.resolve().name.replace("_", " ").replace("-", " ").strip()
            return import_crewai_documents(
                _read(_first(folder, "agents"), "Agents file"),
                _read(_first(folder, "tasks"), "Tasks file"),
                crew,
                name=name or project.capitalize(),
                **flags,
            )
        document = _read(path, "File")
        if tasks_path:
            return import_crewai_documents(
                document, _read(Path(tasks_path), "Tasks file"), crew, name=name, **flags
            )
        if is_native(document):
            return import_document(document, owner=user, replace=replace, trusted=True)
        if looks_like_agents(document):
            raise _fail(
                f"{path} looks like a CrewAI agents.yaml: pass its tasks.yaml with "
                "--crewai-tasks PATH."
            )
        if looks_like_tasks(document):
            raise _fail(
                f"{path} looks like a CrewAI tasks.yaml: pass the agents.yaml as PATH "
                "and this file with --crewai-tasks."
            )
        raise _fail(f"{path} is neither a Baton export (no baton_export key) nor a CrewAI file.")

    def _report(self, result: ImportResult) -> None:
        workflow = result.workflow
        status = (
            f"version {result.version.number} published"
            if result.version
            else "draft only, not published"
        )
        self.stdout.write(
            self.style.SUCCESS(f"Imported workflow '{workflow.slug}' ({workflow.name}): {status}.")
        )
        for line in result.created:
            self.stdout.write(f"  created: {line}")
        for problem in result.problems:
            self.stdout.write(self.style.WARNING(f"  problem: {problem}"))
        if result.problems:
            self.stdout.write(f"{len(result.problems)} problem(s) to look at.")
