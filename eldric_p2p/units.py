"""Byte sizes for humans: `parse_size("1.5GiB")` and `format_size(n)`."""

from __future__ import annotations

import re

from eldric_p2p.errors import UsageError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)\s*$", re.ASCII)


def parse_size(text: str) -> int:
    """Bytes in `text`: bare bytes (`1048576`), SI (`2G`, `2GB` = 2e9) or binary (`1.5GiB`, `800MiB`).

    Units are case-insensitive. Raises UsageError for anything else (negative, empty, unknown unit).
    """
    m = _SIZE_RE.match(text.lower())
    if not m or m.group(2) not in _UNITS:
        raise UsageError(f"not a size: {text!r} (try 1.5GiB, 800MiB, 2G or a number of bytes)")
    value = float(m.group(1)) * _UNITS[m.group(2)]
    if m.group(2) in ("", "b") and "." in m.group(1):
        raise UsageError(f"not a whole number of bytes: {text!r}")
    return int(round(value))


def format_size(n: int | float) -> str:
    """`1610612736` -> `'1.50 GiB'`."""
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(x) < 1024 or unit == "GiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.2f} {unit}"
        x /= 1024
    raise AssertionError("unreachable")
