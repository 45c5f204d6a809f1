"""The SQL that turns a column's values into fakes, on the server, from a keyed hash.

Every fake is a function of ``sha256(key || 0x00 || value::text)`` (PostgreSQL's built-in
``sha256``), the key read from the session setting :data:`KEY_SETTING` that the take sets
with a query parameter: the same value gives the same fake in every column of the same
form, in every table and every take under one key; another key gives others. Names, streets
and words come from the small lists below, picked by the hash's digits.

Two forms: a column under a unique index gets the *unique* form of its kind (16 hex digits
of the hash added, 64 bits: distinct values stay distinct at any realistic size); emails and
hashes always have that form, so an email masks the same in ``auth.users`` (unique) and in
an app table (not). NULL stays NULL and an empty string stays empty.

A json/jsonb document is rebuilt with every string masked at any depth (:func:`_json`), in
plain SQL: the take's transaction is read-only on the source, so no function can be made
for it. Each level of objects and arrays is one correlated subquery over its members, the
next level's expression written once inside it, nested :data:`JSON_DEPTH` levels deep; an
object or array deeper than that is replaced by its text, masked as one string (nothing
unmasked passes; only its shape is lost). A recursive CTE would reach any depth, but it
cannot aggregate in its recursive step, so the document would be rebuilt by one
``jsonb_set`` per string (a copy of the document each: quadratic in a large array) after a
walk and its sort, per row; the nested subqueries cost what the one-level rule cost
(measured: 100,000 flat documents, 2.5 s either way) and a document's members are read once.
"""

from __future__ import annotations

import re

from psycopg import sql

from snapshot.masking.rules import KEEP, VALUE, Rule

KEY_SETTING = "snapshot.mask_key"

FIRST_NAMES = (
    "Ada", "Alan", "Amara", "Ana", "Ben", "Chen", "Clara", "Dara", "Elif", "Emma", "Erik",
    "Farah", "Grace", "Hana", "Ivan", "Jonas", "Kai", "Lena", "Luis", "Maya", "Mia", "Nadia",
    "Noah", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Sara", "Tomas", "Uma", "Vera", "Wei",
    "Yara", "Yusuf", "Zoe",
)  # fmt: skip
LAST_NAMES = (
    "Adams", "Baker", "Berg", "Costa", "Davies", "Diaz", "Evans", "Fischer", "Garcia", "Haas",
    "Ito", "Jensen", "Khan", "Kim", "Lopez", "Meyer", "Moreau", "Nagy", "Novak", "Okafor",
    "Park", "Patel", "Quist", "Rossi", "Sato", "Silva", "Smith", "Tanaka", "Varga", "Weber",
    "Wong", "Young", "Zhang",
)  # fmt: skip
STREETS = (
    "Oak Street", "Maple Avenue", "Station Road", "Mill Lane", "Church Street", "High Street",
    "Park Road", "River Walk", "Harbour Way", "Linden Allee", "Canal Street", "Hill Road",
)  # fmt: skip
CITIES = (
    "Springfield", "Riverton", "Lakeside", "Fairview", "Kingsport", "Milton", "Ashford",
    "Brookfield", "Cedar Falls", "Northwood",
)  # fmt: skip
LOREM = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt "
    "ut labore et dolore magna aliqua ut enim ad minim veniam quis nostrud exercitation "
)
DOMAIN = "example.com"

TEXT_TYPES = ("text", "character varying", "character", "citext", "name")
INTEGER_TYPES = {"smallint": 32767, "integer": 2147483647}
TIME_TYPES = ("date", "timestamp", "time")
ARRAY_KINDS = ("email", "name", "phone", "address", "text", "ip", "hash")
# The longest unique-form fake of each kind: cut shorter, two could collide (text keeps its
# digits first, so only they must fit).
UNIQUE_WIDTH = {
    "email": 44,
    "name": 30,
    "phone": 21,
    "address": 50,
    "text": 16,
    "ip": 39,
    "hash": 32,
}


def key_hash(value: sql.Composable) -> sql.Composable:
    """64 hex digits: the keyed sha256 of ``value``'s text (NULL for NULL)."""
    return sql.SQL(
        "encode(sha256(convert_to(current_setting({}), 'UTF8') || '\\x00'::bytea || "
        "convert_to(({})::text, 'UTF8')), 'hex')"
    ).format(sql.Literal(KEY_SETTING), value)


def _number(h: sql.Composable, start: int) -> sql.Composable:
    """A non-negative 60-bit number from 15 of the hash's hex digits, from ``start`` (1-based)."""
    return sql.SQL("('x' || substr({}, {}, 15))::bit(60)::bigint").format(h, sql.Literal(start))


def _pick(words: tuple[str, ...], h: sql.Composable, start: int) -> sql.Composable:
    array = sql.SQL(", ").join(map(sql.Literal, words))
    return sql.SQL("(ARRAY[{}]::text[])[1 + mod({}, {})::int]").format(
        array, _number(h, start), sql.Literal(len(words))
    )


def _digits(h: sql.Composable) -> sql.Composable:
    return sql.SQL("substr({}, 1, 16)").format(h)


def _fake_text(kind: str, v: sql.Composable, h: sql.Composable, unique: bool) -> sql.Composable:
    """The fake of kind ``kind`` for the text ``v`` whose keyed hash is ``h``."""
    if kind == "email":
        return sql.SQL("lower({}) || '.' || lower({}) || '.' || {} || '@' || {}").format(
            _pick(FIRST_NAMES, h, 17), _pick(LAST_NAMES, h, 33), _digits(h), sql.Literal(DOMAIN)
        )
    if kind == "name":
        fake = sql.SQL("{} || ' ' || {}").format(
            _pick(FIRST_NAMES, h, 17), _pick(LAST_NAMES, h, 33)
        )
    elif kind == "phone":
        width = 16 if unique else 7
        digits: sql.Composable = sql.SQL("lpad(mod({}, {})::text, 7, '0')").format(
            _number(h, 1), sql.Literal(10**7)
        )
        if width == 16:
            digits = sql.SQL(
                "lpad(mod({}, {})::text, 8, '0') || lpad(mod({}, {})::text, 8, '0')"
            ).format(_number(h, 1), sql.Literal(10**8), _number(h, 17), sql.Literal(10**8))
        return sql.SQL("CASE WHEN {} LIKE '+%%' THEN '+' ELSE '' END || '1555' || {}").format(
            v, digits
        )
    elif kind == "address":
        fake = sql.SQL("(1 + mod({}, 9999))::text || ' ' || {} || ', ' || {}").format(
            _number(h, 1), _pick(STREETS, h, 17), _pick(CITIES, h, 33)
        )
    elif kind == "text":
        fake = sql.SQL(
            "substr(repeat({lorem}, 2 + length({v}) / {n}), 1 + mod({num}, {n})::int, length({v}))"
        ).format(lorem=sql.Literal(LOREM), v=v, n=sql.Literal(len(LOREM)), num=_number(h, 1))
    elif kind == "ip":
        if unique:
            groups = [
                sql.SQL("substr({}, {}, 4)").format(h, sql.Literal(i)) for i in range(3, 31, 4)
            ]
            return sql.SQL("'fd' || substr({}, 1, 2) || ':' || {}").format(
                h, sql.SQL(" || ':' || ").join(groups)
            )
        octets = [
            sql.SQL("('x' || substr({}, {}, 2))::bit(8)::int::text").format(h, sql.Literal(i))
            for i in (1, 3, 5)
        ]
        return sql.SQL("'10.' || {}").format(sql.SQL(" || '.' || ").join(octets))
    elif kind == "hash":
        return sql.SQL("substr({}, 1, 32)").format(h)
    elif kind == "url":
        return sql.SQL("'https://' || {} || '/' || {}").format(sql.Literal(DOMAIN), _digits(h))
    else:
        raise AssertionError(f"no text fake of kind {kind}")
    if not unique:
        return fake
    if kind == "text":  # the digits first: a value as long as its column is cut at the end
        return sql.SQL("{} || ' ' || {}").format(_digits(h), fake)
    return sql.SQL("{} || ' ' || {}").format(fake, _digits(h))


def _keep_empty(v: sql.Composable, fake: sql.Composable) -> sql.Composable:
    return sql.SQL("CASE WHEN {v} = '' THEN {v} ELSE {fake} END").format(v=v, fake=fake)


def _json_string(key: sql.Composable, value: sql.Composable) -> sql.Composable:
    """A JSON string value masked by its key's name and its look (a uuid is an id: kept)."""
    s, h = sql.SQL("j.s"), sql.SQL("j.h")
    fake = sql.SQL(
        "CASE WHEN j.s ~ '^[0-9a-fA-F]{{8}}-[0-9a-fA-F-]{{27}}$' THEN j.s "
        "WHEN {key} IN ('sub', 'id', 'provider_id', 'user_id') THEN {hash} "
        "WHEN j.s ~ '@' OR {key} ~* 'mail' THEN {email} "
        "WHEN {key} ~* 'phone|mobile' THEN {phone} "
        "WHEN {key} ~* 'name' THEN {name} "
        "WHEN {key} ~* 'address|street|city' THEN {address} "
        "WHEN {key} ~* 'url|avatar|picture|image' THEN {url} "
        "ELSE {text} END"
    ).format(
        key=key,
        hash=_fake_text("hash", s, h, False),
        email=_fake_text("email", s, h, False),
        phone=_fake_text("phone", s, h, False),
        name=_fake_text("name", s, h, False),
        address=_fake_text("address", s, h, False),
        url=_fake_text("url", s, h, False),
        text=_fake_text("text", s, h, False),
    )
    return sql.SQL(
        "(SELECT to_jsonb({fake}) FROM (SELECT x.s, {hash} AS h "
        "FROM (SELECT {value} #>> '{{}}' AS s) AS x OFFSET 0) AS j)"
    ).format(fake=_keep_empty(s, fake), hash=key_hash(sql.SQL("x.s")), value=value)


JSON_DEPTH = 8  # objects and arrays nested this deep keep their shape; deeper ones become a string


def _json_node(value: sql.Composable, key: sql.Composable, depth: int) -> sql.Composable:
    """A JSON value at ``depth`` (1: the document), whose nearest object key is ``key``:
    strings masked, objects and arrays rebuilt with their members masked, the rest kept.

    An object or array deeper than :data:`JSON_DEPTH` is replaced by its text, masked as one
    string. Each level's members are read by one subquery (an object's by ``jsonb_each``, an
    array's by ``jsonb_array_elements``, the other one given NULL reads nothing), so the next
    level's expression is written once: the SQL grows with the depth, not with a power of
    it. ``OFFSET 0`` keeps that subquery apart: flattened into the aggregates above it, its
    expression would be copied into both (planning took 4 s at depth 8). Array elements
    take their array's key (``"phones": [...]``).
    """
    string = _json_string(key, value)
    if depth > JSON_DEPTH:
        container = _json_string(key, sql.SQL("to_jsonb(({})::text)").format(value))
    else:
        c = sql.Identifier(f"snapshot$j{depth}")
        member = _json_node(sql.SQL("{}.v").format(c), sql.SQL("{}.name").format(c), depth + 1)
        container = sql.SQL(
            "(SELECT CASE jsonb_typeof({v}) WHEN 'object' THEN "
            "coalesce(jsonb_object_agg(m.k, m.v) FILTER (WHERE m.k IS NOT NULL), '{{}}'::jsonb) "
            "ELSE coalesce(jsonb_agg(m.v ORDER BY m.o) FILTER (WHERE m.k IS NULL), '[]'::jsonb) "
            "END "
            "FROM (SELECT {c}.k, {c}.o, {member} AS v FROM ("
            "SELECT e.key AS k, 0::bigint AS o, e.value AS v, e.key AS name FROM "
            "jsonb_each(CASE WHEN jsonb_typeof({v}) = 'object' THEN {v} END) AS e "
            "UNION ALL SELECT NULL, a.o, a.value, {key} FROM "
            "jsonb_array_elements(CASE WHEN jsonb_typeof({v}) = 'array' THEN {v} END) "
            "WITH ORDINALITY AS a(value, o)) AS {c} OFFSET 0) AS m)"
        ).format(v=value, c=c, member=member, key=key)
    return sql.SQL(
        "CASE WHEN jsonb_typeof({v}) = 'string' THEN {string} "
        "WHEN jsonb_typeof({v}) IN ('object', 'array') THEN {container} ELSE {v} END"
    ).format(v=value, string=string, container=container)


def _json(column: sql.Composable) -> sql.Composable:
    """A json/jsonb document with every string value masked at any depth by
    :func:`_json_node`: keys, nesting, array lengths and order, numbers, booleans and nulls
    kept."""
    return _json_node(sql.SQL("({})::jsonb").format(column), sql.Literal(""), 1)


def check_rule(rule: Rule, column: str, type_: str, not_null: bool, unique: bool) -> str | None:
    """Why ``rule`` cannot mask this column (None when it can)."""
    base = type_.removesuffix("[]")
    array = type_.endswith("[]")
    if rule.kind == "null" and not_null:
        return "is NOT NULL: it cannot be null"
    if rule.kind == VALUE and unique:
        return "is under a unique index: one fixed value would repeat"
    if rule.kind == "date" and (array or not base.startswith(TIME_TYPES)):
        return f"is {type_}: a date rule shifts dates and timestamps"
    if rule.kind == "json" and base not in ("json", "jsonb"):
        return f"is {type_}: a json rule masks json or jsonb"
    if array and rule.kind not in (*ARRAY_KINDS, "null", KEEP, VALUE):
        return f"is {type_}: a {rule.kind} rule does not mask arrays"
    if rule.kind == "hash" and base in INTEGER_TYPES and unique:
        return f"is {type_} under a unique index: a hash that stays unique needs bigint or text"
    width = re.fullmatch(r"(?:character varying|character)\((\d+)\)", base)
    needed = UNIQUE_WIDTH.get(rule.kind, 0)
    if width and unique and int(width.group(1)) < needed:
        return (
            f"is {type_} under a unique index: its fakes (up to {needed} characters) would be "
            "cut and could collide"
        )
    return None


def masked(
    rule: Rule, column: str, type_: str, unique: bool, h: sql.Composable | None
) -> sql.Composable:
    """The SQL giving column ``column`` (of type ``type_``, read as ``s.column``) masked by
    ``rule``, cast back to its type; ``h`` is the column's :func:`key_hash`, computed once
    per row in an inner query, for the kinds that use it (:func:`needs_hash`)."""
    v = sql.Identifier("s", column)
    cast = sql.SQL(type_)
    if rule.kind == KEEP:
        return v
    if rule.kind == "null":
        return sql.SQL("NULL::{}").format(cast)
    if rule.kind == VALUE:
        return sql.SQL("CASE WHEN {v} IS NULL THEN NULL ELSE {value}::{t} END").format(
            v=v, value=sql.Literal(rule.value), t=cast
        )
    if rule.kind == "date":
        assert h is not None
        shift = sql.SQL("(mod({}, {}) - {})::int").format(
            _number(h, 1), sql.Literal(2 * rule.days + 1), sql.Literal(rule.days)
        )
        return sql.SQL("({} + make_interval(days => {}))::{}").format(v, shift, cast)
    if rule.kind == "json":
        return sql.SQL("({})::{}").format(_json(v), cast)
    if rule.kind == "provider_id":
        assert h is not None
        return sql.SQL("CASE WHEN {v} = s.user_id::text THEN {v} ELSE {hash} END").format(
            v=v, hash=_fake_text("hash", v, h, False)
        )
    base = type_.removesuffix("[]")
    if type_.endswith("[]"):
        fake = _typed_fake(rule.kind, sql.SQL("u.e::text"), sql.SQL("u.h"), base, False)
        return sql.SQL(
            "CASE WHEN {v} IS NULL THEN NULL ELSE coalesce((SELECT array_agg({fake} ORDER BY u.o) "
            "FROM (SELECT e, o, {hash} AS h FROM unnest({v}) WITH ORDINALITY AS a(e, o) OFFSET 0) "
            "AS u), '{{}}')::{t} END"
        ).format(v=v, fake=fake, hash=key_hash(sql.SQL("a.e")), t=cast)
    assert h is not None
    return sql.SQL("({})::{}").format(
        _typed_fake(rule.kind, sql.SQL("{}::text").format(v), h, base, unique), cast
    )


def _typed_fake(
    kind: str, text: sql.Composable, h: sql.Composable, base: str, unique: bool
) -> sql.Composable:
    """A fake for a value of type ``base`` whose text is ``text``: numbers and uuids for a
    hash of such a column, else :func:`_fake_text` (an empty string kept)."""
    if kind == "hash" and base == "uuid":
        return sql.SQL("substr({}, 1, 32)::uuid").format(h)
    if kind == "hash" and base == "bigint":
        return _number(h, 1)
    if kind == "hash" and base in INTEGER_TYPES:
        return sql.SQL("mod({}, {})").format(_number(h, 1), sql.Literal(INTEGER_TYPES[base]))
    return _keep_empty(text, _fake_text(kind, text, h, unique))


def needs_hash(rule: Rule, type_: str) -> bool:
    """Whether the expression of ``rule`` reads the column's keyed hash from the inner query."""
    return rule.kind not in (KEEP, "null", VALUE, "json") and not type_.endswith("[]")
