"""Hand-written SELECTs for the statements every step runs, read into model instances as the
ORM would read them.

The ORM compiles a query again every time it runs it: for the claim's four-table SELECT that
took about 2.7 ms of CPU per step, for a statement PostgreSQL answers in 0.5; a one-table get()
about 1 ms. A `Rows` is written out once per process from the models' fields, and each row is
turned into instances with the same converters the ORM applies (JSON, decimals, SQLite's dates).

    AGENT = Rows([(Agent, "a", ()), (Role, "r", ())])
    sql = f"SELECT {AGENT.columns()} FROM ... WHERE a.name = %s"
    agent, role = AGENT.first(sql, [name])  # one instance per model, in order (or None)

Relations between them are the caller's to set (`set_cached`), so `agent.role` needs no query.
Fields left out come back deferred: reading one runs a query, as with the ORM's `defer()`.
"""

from __future__ import annotations

import functools

from django.db import connection
from django.db.models import Model


class Rows:
    def __init__(self, parts: list[tuple[type[Model], str, tuple[str, ...]]]):
        """`parts`: (model, table alias in the SQL, names of fields to leave out)."""
        self.parts = parts

    def columns(self) -> str:
        """The SELECT list: every model's columns, in `parts` order."""
        return self._layout(connection.vendor)[0]

    def width(self) -> int:
        """How many of a row's values the models take (anything after them is the caller's)."""
        return sum(len(attnames) for _, attnames, _ in self._layout(connection.vendor)[1])

    def read(self, row) -> list[Model]:
        """One instance per model, from the start of `row`."""
        instances, start = [], 0
        for model, attnames, converters in self._layout(connection.vendor)[1]:
            values = list(row[start : start + len(attnames)])
            start += len(attnames)
            for index, column, found in converters:
                for convert in found:
                    values[index] = convert(values[index], column, connection)
            instances.append(model.from_db(connection.alias, attnames, values))
        return instances

    def first(self, sql: str, params: list) -> list[Model] | None:
        """Run `sql` (a SELECT of `columns()`) and read its first row; None without one."""
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            row = cursor.fetchone()
        return None if row is None else self.read(row)

    def all(self, sql: str, params: list) -> list[list[Model]]:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return [self.read(row) for row in cursor.fetchall()]

    @functools.lru_cache(maxsize=4)  # noqa: B019 (a few module-level instances, never freed)
    def _layout(self, vendor: str) -> tuple[str, list]:
        ops, q = connection.ops, connection.ops.quote_name
        columns, models = [], []
        for model, alias, left_out in self.parts:
            fields = [f for f in model._meta.concrete_fields if f.name not in left_out]
            columns += [f"{q(alias)}.{q(f.column)}" for f in fields]
            converters = []
            for index, field in enumerate(fields):
                column = field.get_col(alias)
                found = ops.get_db_converters(column) + column.get_db_converters(connection)
                if found:
                    converters.append((index, column, found))
            models.append((model, [f.attname for f in fields], converters))
        return ", ".join(columns), models


def all_but(model: type[Model], *kept: str) -> tuple[str, ...]:
    """The names of `model`'s fields other than `kept`: a `parts` entry that reads only those."""
    return tuple(f.name for f in model._meta.concrete_fields if f.name not in kept)


def set_cached(instance: Model, relation: str, related: Model) -> None:
    """Make `instance.<relation>` (a foreign key) return `related` without a query."""
    type(instance)._meta.get_field(relation).set_cached_value(instance, related)


def table(model: type[Model]) -> str:
    return connection.ops.quote_name(model._meta.db_table)
