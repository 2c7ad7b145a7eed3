"""Sizes and durations for humans: `parse_size("1.5GiB")`, `format_size(n)`, `parse_duration("30m")`."""

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


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str, *, max_s: float, allow_zero: bool = False) -> float:
    """Seconds in `'90s'`, `'30m'`, `'24h'`, `'7d'`, `'2w'` or a bare number of seconds, at most `max_s`
    (`allow_zero`: `0` is accepted too). Raises UsageError."""
    text = text.strip().lower()
    try:
        if text and text[-1] in _DURATION_UNITS:
            value = float(text[:-1]) * _DURATION_UNITS[text[-1]]
        else:
            value = float(text)
    except ValueError as exc:
        raise UsageError(f"{text!r}: expected a duration like 90s, 30m, 24h or 7d") from exc
    if not (value == 0 and allow_zero) and not 1 <= value <= max_s:
        raise UsageError(f"{text!r}: a duration between 1 s and {max_s / 86400:.0f} d" +
                         (", or 0" if allow_zero else ""))  # fmt: skip
    return value
