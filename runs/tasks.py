"""Celery tasks: thin wrappers that take ids and call the engine's plain functions."""

from celery import shared_task

from runs import engine


@shared_task(name="runs.tasks.execute_step", acks_late=True, reject_on_worker_lost=True)
def execute_step_task(step_id: int) -> None:
    engine.execute_steps(step_id)


@shared_task(name="runs.tasks.sweep_stuck_steps")
def sweep_stuck_steps() -> dict:
    return engine.sweep_stuck_steps()
