"""Small parts of sentences: a count with its noun, a duration for people, a path as typed."""

from __future__ import annotations

from pathlib import Path


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``1 row``, ``1,000 rows``, ``2 identities`` (pass ``plural`` when it is not noun + s)."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def duration(seconds: float) -> str:
    """``12 ms`` under a second, ``3.4 s`` above: a short step's time still reads as one."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.1f} s"


def display_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, for messages."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
