"""Byte sizes at the edge: parse "24GiB" / "24GB" and print "13.72 GiB".

Everything inside the project is an integer number of bytes. Binary units (KiB, MiB, GiB,
TiB) are powers of 1024; decimal units (KB, MB, GB, TB) are powers of 1000, as GPU vendors
and disk makers use them. `format_bytes` always prints binary units and says so.
"""

from __future__ import annotations

import math
import re

from planner.errors import ChunkftError

UNITS: dict[str, int] = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}
_UNIT_BY_FOLDED = {name.lower(): name for name in UNITS}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*$")

MAX_BYTES = 2**60
"""1 EiB: the largest size a flag may give (far above any machine; keeps byte sums in int64)."""

VALID_SIZE_HINT = "a positive number with a unit: " + ", ".join(UNITS) + " (e.g. 24GiB or 80GB)"


def parse_bytes(text: str | int, *, what: str = "size") -> int:
    """Parse a size like "24GiB", "80GB", "512MiB" or a plain byte count; must be > 0."""
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(str(text))
        unit = _UNIT_BY_FOLDED.get(match.group(2).lower() if match else "", None)
        if match is None or (match.group(2) and unit is None):
            raise ChunkftError(f"invalid {what} {text!r}: expected {VALID_SIZE_HINT}")
        number = float(match.group(1)) * UNITS[unit or "B"]
        if not math.isfinite(number) or number > MAX_BYTES:
            raise ChunkftError(f"invalid {what} {text!r}: must be at most 1 EiB ({VALID_SIZE_HINT})")
        value = int(round(number))
    if value <= 0:
        raise ChunkftError(f"invalid {what} {text!r}: must be greater than zero ({VALID_SIZE_HINT})")
    if value > MAX_BYTES:
        raise ChunkftError(f"invalid {what} {text!r}: must be at most 1 EiB ({VALID_SIZE_HINT})")
    return value


def format_bytes(n: int | float, *, precision: int = 2) -> str:
    """Format a byte count in binary units: 14729216 -> "14.05 MiB"."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if n >= UNITS[unit]:
            return f"{sign}{n / UNITS[unit]:.{precision}f} {unit}"
    return f"{sign}{int(n)} B"


def describe_size(n: int) -> str:
    """"24.00 GiB (25.77 GB)": both conventions, for echoing what a flag was read as."""
    return f"{format_bytes(n)} ({n / 1e9:.2f} GB)"
