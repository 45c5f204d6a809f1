"""Masking rules: what ``[masking]`` in ``snapshot.toml`` says, and the key they are keyed by.

A rule names what a column's values become in a masked snapshot: a realistic fake of a
kind (``email``, ``name``, ``phone``, ``address``, ``text``, ``ip``, ``json``), a date
shifted by up to ``days``, ``null``, a fixed ``value``, a keyed ``hash``, or ``keep``. The
fakes are computed on the server from a keyed hash of the value (:mod:`.fakes`), under a
key read from an environment variable and never written anywhere: the manifest records
the rules and :func:`fingerprint` of the key. ``auth.users`` and ``auth.identities`` are
masked by :data:`AUTH_RULES` unless ``auth = false``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from snapshot.errors import ConfigError
from snapshot.names import AUTH_IDENTITIES, AUTH_USERS, TableName

KINDS = ("email", "name", "phone", "address", "text", "ip", "json", "date", "hash", "null")
KEEP = "keep"
VALUE = "value"
DEFAULT_KEY_ENV = "SNAPSHOT_MASK_KEY"
DEFAULT_DAYS = 30

# Every masked auth user's password is this one, so a developer can sign in as any of them.
# PASSWORD_HASH is its bcrypt hash (cost 10, as Supabase Auth writes them), computed once:
# SELECT crypt('snapshot-masked', gen_salt('bf', 10)) with pgcrypto.
PASSWORD = "snapshot-masked"
PASSWORD_HASH = "$2a$10$GcvI8Is4uQ976IK0c47EUeudBzMu7iHM7RYbJnRPL3zZ/MTaHeG9a"


@dataclass(frozen=True)
class Rule:
    """What one column's values become in a masked snapshot."""

    kind: str  # one of KINDS, KEEP or VALUE
    value: str | None = None  # the fixed value of a VALUE rule
    days: int = DEFAULT_DAYS  # how far a "date" rule shifts, either way

    def describe(self) -> str:
        """The rule as the manifest and the reports write it: ``email``, ``value ''``."""
        if self.kind == VALUE and self.value == PASSWORD_HASH:
            return f"the bcrypt hash of {PASSWORD!r}"
        if self.kind == VALUE:
            return f"value {self.value!r}"
        if self.kind == "date":
            return f"date ±{self.days} days"
        return self.kind


def parse_rule(raw: Any, where: str) -> Rule:
    """A rule from its TOML: a kind, ``{ value = "x" }`` or ``{ kind = "date", days = 7 }``."""
    kinds = ", ".join((*KINDS, KEEP))
    if isinstance(raw, str):
        if raw in KINDS or raw == KEEP:
            return Rule(raw)
        raise ConfigError(f'{where} is {raw!r}: write one of {kinds}, or {{ value = "..." }}')
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a kind ({kinds}) or a table, not {raw!r}")
    if set(raw) == {VALUE}:
        if not isinstance(raw[VALUE], str):
            raise ConfigError(f"{where} value must be text (quoted), not {raw[VALUE]!r}")
        return Rule(VALUE, value=raw[VALUE])
    if raw.get("kind") == "date" and set(raw) <= {"kind", "days"}:
        days = raw.get("days", DEFAULT_DAYS)
        if isinstance(days, bool) or not isinstance(days, int) or days < 1:
            raise ConfigError(f"{where} days must be a whole number of at least 1, not {days!r}")
        return Rule("date", days=days)
    raise ConfigError(
        f'{where} is {raw!r}: write a kind ({kinds}), {{ value = "..." }} or '
        '{ kind = "date", days = N }'
    )


@dataclass(frozen=True)
class MaskingSettings:
    """``[masking]``: the rules per column, whether auth is masked, where the key is."""

    # (table, column) -> rule
    columns: Mapping[tuple[TableName, str], Rule] = field(default_factory=dict)
    key_env: str = DEFAULT_KEY_ENV
    auth: bool = True
    configured: bool = False  # snapshot.toml has a [masking] section: the team masks


# auth.users and auth.identities in a masked snapshot, for the columns that exist. The
# password hashes become PASSWORD_HASH; tokens are emptied (a token is a login).
_TOKEN = Rule(VALUE, value="")
AUTH_RULES: Mapping[TableName, Mapping[str, Rule]] = {
    AUTH_USERS: {
        "email": Rule("email"),
        "phone": Rule("phone"),
        "email_change": Rule("email"),
        "phone_change": Rule("phone"),
        "raw_user_meta_data": Rule("json"),
        "encrypted_password": Rule(VALUE, value=PASSWORD_HASH),
        "confirmation_token": _TOKEN,
        "recovery_token": _TOKEN,
        "email_change_token_new": _TOKEN,
        "email_change_token_current": _TOKEN,
        "phone_change_token": _TOKEN,
        "reauthentication_token": _TOKEN,
    },
    AUTH_IDENTITIES: {
        "identity_data": Rule("json"),
        # An email identity's provider_id is its user's id (kept); another provider's is the
        # person's id there: hashed, as the json rule hashes identity_data's "sub".
        "provider_id": Rule("provider_id"),
    },
}


def read_key(settings: MaskingSettings, env_name: str) -> str:
    """The masking key from its environment variable; its absence is one line saying what to do."""
    key = os.environ.get(settings.key_env, "")
    if len(key) < 16:
        state = "is not set" if not key else "is shorter than 16 characters"
        raise ConfigError(
            f"refusing to take {env_name}: it is not marked safe, so its snapshot is masked, "
            f"and the masking key ${settings.key_env} {state}; set it to a long random secret "
            "the team keeps (the same one gives the same fakes in every take), or pass "
            "--unmasked to take it as it is"
        )
    return key


def fingerprint(key: str) -> str:
    """What the manifest records of the key: enough to tell two keys apart, not to find one."""
    return hashlib.sha256(b"snapshot masking key\0" + key.encode()).hexdigest()[:16]
