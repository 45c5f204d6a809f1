"""Columns that look personal: found by name and by sampled content, each with a suggested rule.

A masked take refuses while any such column has no rule (``keep`` is a rule), so nothing
personal slips through unnoticed; ``check`` lists them. The content test runs on the
server over a sample of each table's first rows: only counts come back, never a value.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import psycopg
from psycopg import sql

from snapshot import text
from snapshot.catalog import Column, TableShape
from snapshot.names import AUTH_TABLES, TableName, quote

SAMPLE_ROWS = 500  # values that are not null, per column
SCAN_ROWS = 50_000  # rows read at most, per column, to find them

# (pattern on the column's name, suggested rule), the first that matches.
_BY_NAME = (
    (re.compile(r"(^|_)ip($|_)|ip_?addr|remote_addr"), "ip"),
    (re.compile(r"e_?mail"), "email"),
    (re.compile(r"phone|mobile|(^|_)tel($|_)|(^|_)fax($|_)|msisdn"), "phone"),
    (
        re.compile(
            r"(first|last|full|display|given|family|middle|maiden|real|contact|user|nick)_?name"
            r"|surname"
        ),
        "name",
    ),
    (re.compile(r"address|street|(^|_)city($|_)|(^|_)zip($|_)|postal|postcode"), "address"),
    (re.compile(r"birth|(^|_)dob($|_)"), "date"),
    (re.compile(r"ssn|passport|iban|tax_?id|national_?id|card_?number"), "hash"),
    (re.compile(r"^bio$|biography|about_me"), "text"),
)
# A plain "name" is a person's in a table of people.
_PEOPLE_TABLE = re.compile(
    r"user|profile|member|customer|account|contact|person|people|employee|staff|author|client"
    r"|patient|student"
)
_TEXTUAL = ("text", "character varying", "character", "citext", "json", "jsonb")
_EMAIL = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"
_PHONE = r"^\+?[0-9][0-9 ().-]{6,18}[0-9]$"
_NOT_PHONE = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}"
_IPV4 = r"^[0-9]{1,3}(\.[0-9]{1,3}){3}$"


@dataclass(frozen=True)
class Suspect:
    """A column that looks personal and has no rule."""

    table: TableName
    column: str
    rule: str  # the suggested rule
    why: str  # "its name", "sampled values: 12 of 40 hold an email"

    @property
    def setting(self) -> str:
        """The suggested line for ``[masking.columns]``."""
        name = f"{self.table}.{quote(self.column)}".replace("'", "\\'")
        return f"'{name}' = \"{self.rule}\""


def _by_name(table: TableName, column: Column) -> str | None:
    name = column.name.lower()
    for pattern, rule in _BY_NAME:
        if pattern.search(name):
            if rule == "date" and not column.type.startswith(("date", "timestamp")):
                return "hash"
            return _for_type(rule, column.type)
    if name == "name" and _PEOPLE_TABLE.search(table.name.lower()):
        return _for_type("name", column.type)
    return None


def _for_type(rule: str, type_: str) -> str:
    """A json column gets the json rule whatever its content looks like."""
    return "json" if type_ in ("json", "jsonb") else rule


def _textual(column: Column) -> bool:
    return column.type.removesuffix("[]").startswith(_TEXTUAL) or column.type in ("inet", "cidr")


def find(
    conn: psycopg.Connection,
    shapes: Mapping[TableName, TableShape],
    ruled: Collection[tuple[TableName, str]],
    *,
    skip_auth: bool,
) -> list[Suspect]:
    """Columns of ``shapes`` without a rule in ``ruled`` that look personal."""
    found = []
    for table, shape in shapes.items():
        if skip_auth and table in AUTH_TABLES:
            continue
        open_columns = [c for c in shape.columns if (table, c.name) not in ruled]
        sampled = _sample(conn, table, [c for c in open_columns if _textual(c)])
        for column in open_columns:
            rule = _by_name(table, column)
            if rule is not None:
                found.append(Suspect(table, column.name, rule, "its name"))
            elif column.name in sampled:
                rule, why = sampled[column.name]
                found.append(Suspect(table, column.name, _for_type(rule, column.type), why))
    return found


def _sample(
    conn: psycopg.Connection, table: TableName, columns: list[Column]
) -> dict[str, tuple[str, str]]:
    """Per column whose sampled values look personal: (suggested rule, why)."""
    if not columns:
        return {}
    parts: list[sql.Composable] = []
    for column in columns:
        # Up to SAMPLE_ROWS values that are not null, among the first SCAN_ROWS rows.
        parts.append(
            sql.SQL(
                "(SELECT ARRAY[count(v), count(*) FILTER (WHERE v ~ {email}), "
                "count(*) FILTER (WHERE v ~ {phone} AND v !~ {not_phone}), "
                "count(*) FILTER (WHERE v ~ {ip})] "
                "FROM (SELECT c::text AS v FROM (SELECT {c} AS c FROM {t} LIMIT {scan}) AS r "
                "WHERE c IS NOT NULL LIMIT {sample}) AS s)"
            ).format(
                email=sql.Literal(_EMAIL),
                phone=sql.Literal(_PHONE),
                not_phone=sql.Literal(_NOT_PHONE),
                ip=sql.Literal(_IPV4),
                c=sql.Identifier(column.name),
                t=table.ident,
                scan=sql.Literal(SCAN_ROWS),
                sample=sql.Literal(SAMPLE_ROWS),
            )
        )
    query = sql.SQL("SELECT {}").format(sql.SQL(", ").join(parts))
    row = conn.execute(query).fetchone()
    assert row is not None
    result = {}
    for i, column in enumerate(columns):
        values, emails, phones, ips = row[i]
        if column.type in ("inet", "cidr"):
            result[column.name] = ("ip", "its type")
        elif emails:
            rule = "email" if emails * 2 >= values else "text"
            result[column.name] = (rule, f"sampled values: {emails} of {values} hold an email")
        elif values and phones * 2 >= values:
            result[column.name] = (
                "phone",
                f"sampled values: {phones} of {values} are phone numbers",
            )
        elif values and ips * 2 >= values:
            result[column.name] = ("ip", f"sampled values: {ips} of {values} are IP addresses")
    return result


def refusal(env_name: str, suspects: list[Suspect]) -> str:
    """The one line that stops a masked take while personal-looking columns have no rule."""
    shown = "; ".join(f"{s.setting} ({s.why})" for s in suspects[:6])
    more = f"; and {len(suspects) - 6} more" if len(suspects) > 6 else ""
    one = len(suspects) == 1
    columns = f"{text.count(len(suspects), 'column')} {'looks' if one else 'look'} personal"
    return (
        f"refusing to take {env_name}: {columns} and {'has' if one else 'have'} no masking "
        f"rule: {shown}{more}; add a rule for each under [masking.columns] in snapshot.toml "
        "(\"keep\" takes one as it is), as 'snapshot check' suggests"
    )


def listing(env_name: str, suspects: list[Suspect]) -> str:
    """What ``check`` says of them: each with the rule to add (all of them, unlike the take's
    refusal, so the lines can be copied into ``[masking.columns]``)."""
    if not suspects:
        return f"every column of {env_name} that looks personal has a masking rule"
    one = len(suspects) == 1
    columns = "; ".join(f"{s.setting} ({s.why})" for s in suspects)
    return (
        f"{text.count(len(suspects), 'column')} of {env_name} {'looks' if one else 'look'} "
        f"personal and {'has' if one else 'have'} no masking rule, so a take of {env_name} "
        f"refuses: add under [masking.columns] in snapshot.toml: {columns}"
    )
