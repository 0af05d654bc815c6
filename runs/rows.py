"""Hand-written statements for what every step runs: SELECTs read into model instances as the
ORM would read them, and INSERTs and UPDATEs whose values each model field prepares as the ORM
would prepare them.

The ORM compiles a query again every time it runs it: for the claim's four-table SELECT that
took about 2.7 ms of CPU per step, for a statement PostgreSQL answers in 0.5; a one-table get()
about 1 ms. A `Rows` is written out once per process from the models' fields, and each row is
turned into instances with the same converters the ORM applies (JSON, decimals, SQLite's dates).

    AGENT = Rows([(Agent, "a", ()), (Role, "r", ())])
    sql = f"SELECT {AGENT.columns()} FROM ... WHERE a.name = %s"
    agent, role = AGENT.first(sql, [name])  # one instance per model, in order (or None)

Relations between them are the caller's to set (`set_cached`), so `agent.role` needs no query.
Fields left out come back deferred: reading one runs a query, as with the ORM's `defer()`.

    insert([event, ...])  # one INSERT ... RETURNING id; sets each instance's pk
    update(Step, "id = %s AND attempt = %s", [pk, 2], values={"status": "failed"}, add={"cost": c})
"""

from __future__ import annotations

from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.db.models import Model


class Rows:
    def __init__(self, parts: list[tuple[type[Model], str, tuple[str, ...]]]):
        """`parts`: (model, table alias in the SQL, names of fields to leave out)."""
        self.parts = parts
        self._layouts: dict[str, tuple[str, list]] = {}

    def columns(self) -> str:
        """The SELECT list: every model's columns, in `parts` order."""
        return self._layout(connection.vendor)[0]

    def width(self) -> int:
        """How many of a row's values the models take (anything after them is the caller's)."""
        return sum(len(attnames) for _, attnames, _ in self._layout(connection.vendor)[1])

    def read(self, row) -> list[Model]:
        """One instance per model, from the start of `row`."""
        db = connection_itself()
        instances, start = [], 0
        for model, attnames, converters in self._layout(db.vendor)[1]:
            values = list(row[start : start + len(attnames)])
            start += len(attnames)
            for index, column, found in converters:
                for convert in found:
                    values[index] = convert(values[index], column, db)
            instances.append(model.from_db(db.alias, attnames, values))
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

    def _layout(self, vendor: str) -> tuple[str, list]:
        """Worked out once per instance and database vendor."""
        layout = self._layouts.get(vendor)
        if layout is None:
            layout = self._layouts[vendor] = self._work_out_layout()
        return layout

    def _work_out_layout(self) -> tuple[str, list]:
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


def insert(instances: list[Model], *, unless_conflicting: bool = False) -> bool:
    """Insert new instances of one model in one statement and set their primary keys. Every
    field but the key is written, from `pre_save` (so auto_now_add and defaults apply).

    `unless_conflicting` (one instance): write nothing when a row with the same unique values
    exists, and answer False. The transaction goes on as if nothing was tried: no error, so
    no savepoint is needed around the INSERT."""
    if unless_conflicting and len(instances) != 1:
        raise ValueError("unless_conflicting inserts one instance")
    model = type(instances[0])
    fields = [f for f in model._meta.concrete_fields if not f.primary_key]
    db = connection_itself()
    q = db.ops.quote_name
    row = f"({', '.join(['%s'] * len(fields))})"
    params = [
        field.get_db_prep_save(field.pre_save(instance, True), db)
        for instance in instances
        for field in fields
    ]
    with db.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table(model)} ({', '.join(q(f.column) for f in fields)}) "
            f"VALUES {', '.join([row] * len(instances))}"
            f"{' ON CONFLICT DO NOTHING' if unless_conflicting else ''}"
            f" RETURNING {q(model._meta.pk.column)}",
            params,
        )
        keys = [pk for (pk,) in cursor.fetchall()]
    if not keys and unless_conflicting:
        return False
    # Both databases return a multi-row VALUES insert's keys in the order given (the ORM's
    # bulk_create relies on it too).
    for instance, pk in zip(instances, keys, strict=True):
        instance.pk = pk
        instance._state.adding, instance._state.db = False, db.alias
    return True


def update(
    model: type[Model],
    where: str,
    params: list,
    *,
    values: dict | None = None,
    add: dict | None = None,
) -> int:
    """UPDATE `model`'s rows matching `where` (SQL with %s, filled from `params`): set each of
    `values` (prepared by its field; a model instance for a foreign key) and add each of `add`
    to its column. Returns how many rows changed."""
    db = connection_itself()
    q, meta = db.ops.quote_name, model._meta
    sets, args = [], []
    for name, value in (values or {}).items():
        field = meta.get_field(name)
        if field.is_relation and isinstance(value, Model):
            value = value.pk
        sets.append(f"{q(field.column)} = %s")
        args.append(field.get_db_prep_save(value, db))
    for name, amount in (add or {}).items():
        field = meta.get_field(name)
        sets.append(f"{q(field.column)} = {q(field.column)} + %s")
        args.append(field.get_db_prep_save(amount, db))
    with db.cursor() as cursor:
        cursor.execute(f"UPDATE {table(model)} SET {', '.join(sets)} WHERE {where}", args + params)
        return cursor.rowcount


def all_but(model: type[Model], *kept: str) -> tuple[str, ...]:
    """The names of `model`'s fields other than `kept`: a `parts` entry that reads only those."""
    return tuple(f.name for f in model._meta.concrete_fields if f.name not in kept)


# What steps look up by name (agents, tools, prices), kept per process under the lookup token
# their claim read: key -> (token, value). See runs/models.py LookupToken.
_kept: dict[tuple, tuple] = {}
KEPT_MAX = 5000


def kept(key: tuple, token: int | None, read):
    """`read()`'s answer for `key`, kept while the lookup token stays `token`: an edit to an
    agent, role, tool or price replaces the token, and the next step reads afresh. Without a
    token (no claim read one) it always reads. Callers must not change what they get."""
    if token is None:
        return read()
    found = _kept.get(key)
    if found is not None and found[0] == token:
        return found[1]
    value = read()
    if len(_kept) >= KEPT_MAX:
        _kept.clear()
    _kept[key] = (token, value)
    return value


def set_cached(instance: Model, relation: str, related: Model) -> None:
    """Make `instance.<relation>` (a foreign key) return `related` without a query."""
    type(instance)._meta.get_field(relation).set_cached_value(instance, related)


def table(model: type[Model]) -> str:
    return connection.ops.quote_name(model._meta.db_table)


def connection_itself():
    """This thread's connection itself: every attribute read through the `connection` proxy
    looks the thread's connection up again, and field preparation reads several per value."""
    return connections[DEFAULT_DB_ALIAS]
