"""What an LLM call cost: the price in force at the call's time, and repricing history.

A ModelPrice row prices its model from `effective_from` until the next row of that model. Cached
prompt tokens are billed at the cached rate, the rest of the prompt at the input rate. With no row
for a model, LiteLLM's bundled price map is the fallback (source "litellm-map"), else the call is
recorded at 0 as "unpriced" so reports show what still needs a price.
"""

from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal

from django.db import transaction
from django.db.models import DecimalField, ExpressionWrapper, F, Value
from django.utils import timezone

from runs import rows
from runs.costs import rebuild_daily_usage
from runs.models import ModelPrice, UsageRecord

SOURCE_PRICE_TABLE = "price-table"
SOURCE_LITELLM_MAP = "litellm-map"
SOURCE_UNPRICED = "unpriced"

_MILLION = Decimal(1_000_000)
_COST_PLACES = Decimal("1e-8")  # as UsageRecord.cost stores it
_RATE_FIELD = DecimalField(max_digits=30, decimal_places=18)
_COST_FIELD = DecimalField(max_digits=14, decimal_places=8)


_PRICE = rows.Rows([(ModelPrice, "p", ())])


def price_for(model: str, at: datetime, token: int | None = None) -> ModelPrice | None:
    """The newest price of `model` that took effect at or before `at`. The model's prices are
    read in one query (written out: every recorded LLM call asks; runs/rows.py) and kept while
    the lookup token is `token` (runs/models.py LookupToken)."""
    for price in rows.kept(("prices", model), token, lambda: _read_prices(model)):
        if price.effective_from <= at:
            return price
    return None


def _read_prices(model: str) -> list[ModelPrice]:
    """Every price of `model`, newest first."""
    sql = (
        f"SELECT {_PRICE.columns()} FROM {rows.table(ModelPrice)} p "
        "WHERE p.model = %s ORDER BY p.effective_from DESC, p.id DESC"
    )
    return [price for (price,) in _PRICE.all(sql, [model])]


def compute_cost(
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    at: datetime | None = None,
    *,
    token: int | None = None,
) -> tuple[Decimal, ModelPrice | None, str]:
    """(cost, the ModelPrice used or None, price_source) of one call made at `at` (now).
    `token`: the lookup token the step's claim read, under which its prices are kept."""
    price = price_for(model, at or timezone.now(), token)
    if price is not None:
        rates = (price.input_per_1m, price.output_per_1m, price.cached_input_per_1m)
        return (
            _cost(rates, prompt_tokens, completion_tokens, cached_tokens),
            price,
            SOURCE_PRICE_TABLE,
        )
    rates = _litellm_rates(model)
    if rates is not None:
        return (
            _cost(rates, prompt_tokens, completion_tokens, cached_tokens),
            None,
            SOURCE_LITELLM_MAP,
        )
    return Decimal(0), None, SOURCE_UNPRICED


def recompute_usage(start: date | datetime, end: date | datetime, model: str | None = None) -> int:
    """Reprice the UsageRecords made in [start, end) (dates: whole days, `end` included) with
    the prices in force at each record's time. Returns how many records were updated.

    Works in SQL: for each model, one UPDATE per price period, never a loop over records.
    1. Find the models used in the range.
    2. Records before the model's first price get LiteLLM's map price, or 0 "unpriced".
    3. Each price period [effective_from, next effective_from) gets that price.
    4. Rebuild the daily rollup (runs.costs) of every UTC day the range touches, for the
       repriced models, in the same transaction: the reports never see the new record costs
       with the old day sums.
    """
    start_at, end_at = _bounds(start, end)
    with transaction.atomic():
        updated = _reprice(start_at, end_at, model)
        _rebuild_rollup(start_at, end_at, model)
    return updated


def _rebuild_rollup(start_at: datetime, end_at: datetime, model: str | None) -> None:
    if end_at <= start_at:
        return
    first_day = start_at.astimezone(UTC).date()
    last_day = (end_at - timedelta(microseconds=1)).astimezone(UTC).date()
    rebuild_daily_usage(first_day, last_day, model=model)


def _reprice(start_at: datetime, end_at: datetime, model: str | None) -> int:
    in_range = UsageRecord.objects.filter(at__gte=start_at, at__lt=end_at)
    if model is not None:
        in_range = in_range.filter(model=model)
    updated = 0
    for name in sorted(set(in_range.values_list("model", flat=True))):
        records = in_range.filter(model=name)
        prices = list(
            ModelPrice.objects.filter(model=name, effective_from__lt=end_at).order_by(
                "effective_from"
            )
        )
        # Drop periods that ended before the range began.
        while len(prices) > 1 and prices[1].effective_from <= start_at:
            prices.pop(0)

        unpriced = records.filter(at__lt=prices[0].effective_from) if prices else records
        rates = _litellm_rates(name)
        if rates is not None:
            updated += unpriced.update(
                cost=_cost_expression(rates), price=None, price_source=SOURCE_LITELLM_MAP
            )
        else:
            updated += unpriced.update(cost=Decimal(0), price=None, price_source=SOURCE_UNPRICED)

        for index, price in enumerate(prices):
            period = records.filter(at__gte=price.effective_from)
            if index + 1 < len(prices):
                period = period.filter(at__lt=prices[index + 1].effective_from)
            rates = (price.input_per_1m, price.output_per_1m, price.cached_input_per_1m)
            updated += period.update(
                cost=_cost_expression(rates), price=price, price_source=SOURCE_PRICE_TABLE
            )
    return updated


def _cost(
    rates: tuple[Decimal, Decimal, Decimal],
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int,
) -> Decimal:
    input_rate, output_rate, cached_rate = rates
    cached = min(max(cached_tokens, 0), prompt_tokens)
    total = (
        (prompt_tokens - cached) * input_rate
        + cached * cached_rate
        + completion_tokens * output_rate
    ) / _MILLION
    return total.quantize(_COST_PLACES, rounding=ROUND_HALF_UP)


def _cost_expression(rates: tuple[Decimal, Decimal, Decimal]) -> ExpressionWrapper:
    """The cost of a UsageRecord row at these per-1M rates, as an SQL expression."""
    input_rate, output_rate, cached_rate = (
        Value(rate / _MILLION, output_field=_RATE_FIELD) for rate in rates
    )
    return ExpressionWrapper(
        (F("prompt_tokens") - F("cached_tokens")) * input_rate
        + F("cached_tokens") * cached_rate
        + F("completion_tokens") * output_rate,
        output_field=_COST_FIELD,
    )


def _litellm_rates(model: str) -> tuple[Decimal, Decimal, Decimal] | None:
    # Imported here: runs.llm loads litellm (seconds), needed only for models without a price.
    from runs.llm import litellm_prices

    prices = litellm_prices(model)
    if prices is None:
        return None
    return prices["input"], prices["output"], prices["cached"]


def _bounds(start: date | datetime, end: date | datetime) -> tuple[datetime, datetime]:
    def aware(value: datetime) -> datetime:
        return timezone.make_aware(value) if timezone.is_naive(value) else value

    if isinstance(start, datetime):
        start_at = aware(start)
    else:
        start_at = aware(datetime.combine(start, time.min))
    if isinstance(end, datetime):
        end_at = aware(end)
    else:  # a date names a whole day: the range runs to the end of it
        end_at = aware(datetime.combine(end + timedelta(days=1), time.min))
    return start_at, end_at
