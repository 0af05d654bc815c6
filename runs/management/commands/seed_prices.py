"""Give every model in use a price, so cost reports start out right.

Idempotent: a model that already has any ModelPrice row is left alone (an admin's price wins).
"""

from datetime import UTC, datetime
from decimal import Decimal

from django.core.management.base import BaseCommand

from runs import scripted
from runs.models import ModelPrice
from teams.models import Agent

SEED_FROM = datetime(2024, 1, 1, tzinfo=UTC)


class Command(BaseCommand):
    help = (
        "Create ModelPrice rows (effective 2024-01-01) for every model an agent uses, from "
        "LiteLLM's bundled price map; scripted/ and self-hosted models get Baton's own prices."
    )

    def handle(self, *args, **options) -> None:
        # Loaded here: runs.llm imports litellm, which takes seconds.
        from runs import llm

        created = skipped = unknown = 0
        for model, self_hosted in sorted(_models_in_use(llm).items()):
            if ModelPrice.objects.filter(model=model).exists():
                skipped += 1
                continue
            rates = _rates(llm, model, self_hosted)
            if rates is None:
                unknown += 1
                self.stdout.write(f"no known price for {model}: add one in the admin")
                continue
            _, made = ModelPrice.objects.get_or_create(
                model=model,
                effective_from=SEED_FROM,
                defaults={
                    "input_per_1m": rates[0],
                    "output_per_1m": rates[1],
                    "cached_input_per_1m": rates[2],
                    "source": "litellm",
                },
            )
            created += made
            self.stdout.write(
                f"{model}: ${rates[0]} in / ${rates[1]} out / ${rates[2]} cached per 1M tokens"
            )
        self.stdout.write(
            self.style.SUCCESS(
                f"{created} created, {skipped} already priced, {unknown} without a known price"
            )
        )


def _models_in_use(llm) -> dict[str, bool]:
    """{model: self-hosted?}. An agent's api_base applies to its own model; fallbacks are
    judged by their provider prefix alone."""
    models: dict[str, bool] = {"scripted/baton": False}
    for agent in Agent.objects.only("model", "fallback_models", "api_base"):
        uses = [(agent.model, agent.api_base)]
        uses += [(m, None) for m in agent.fallback_models or [] if isinstance(m, str)]
        for model, api_base in uses:
            model = model.strip()
            if model:
                models[model] = models.get(model, False) or llm.is_self_hosted(model, api_base)
    return models


def _rates(llm, model: str, self_hosted: bool) -> tuple | None:
    if model.startswith("scripted/"):
        prices = scripted.PRICE_PER_1M
        return prices["input"], prices["output"], prices["cached"]
    if self_hosted:
        return Decimal(0), Decimal(0), Decimal(0)  # our own hardware: no per-token bill
    prices = llm.litellm_prices(model)
    if prices is None:
        return None
    return prices["input"], prices["output"], prices["cached"]
