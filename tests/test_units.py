from __future__ import annotations

import pytest

from eldric_p2p.errors import UsageError
from eldric_p2p.units import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.5GiB", 1610612736),
        ("800MiB", 800 * 1024**2),
        ("2G", 2_000_000_000),
        ("2gb", 2_000_000_000),
        ("1048576", 1048576),
        ("512 KiB", 512 * 1024),
        (" 3TiB ", 3 * 1024**4),
        ("0.5g", 500_000_000),
        ("100b", 100),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "-1G", "1.5", "1.5XB", "1e9", "1,5G", "ten"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="size|bytes"):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(1610612736) == "1.50 GiB"
    assert format_size(512) == "512 B"
    assert format_size(800 * 1024**2) == "800.00 MiB"
