"""Byte units at the edge: binary and decimal units parse exactly; bad sizes name the value."""

from __future__ import annotations

import pytest

from planner.errors import ChunkftError
from planner.units import describe_size, format_bytes, parse_bytes


@pytest.mark.parametrize("text, expected", [
    ("24GiB", 24 * 2**30),
    ("24GB", 24 * 10**9),
    ("512MiB", 512 * 2**20),
    ("512MB", 512 * 10**6),
    ("1.5TB", 1_500_000_000_000),
    ("1.5TiB", 3 * 2**39),
    ("13.72GiB", round(13.72 * 2**30)),
    ("24 gib", 24 * 2**30),
    ("64KiB", 65536),
    ("4096", 4096),
    ("4096B", 4096),
    (4096, 4096),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected
    assert isinstance(parse_bytes(text), int)


@pytest.mark.parametrize("text", ["24XB", "-3GiB", "0", "", "0GiB", "GiB", "24 Gigs", "1e3e3GB"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ChunkftError) as info:
        parse_bytes(text, what="GPU budget")
    message = str(info.value)
    assert repr(text) in message and "GPU budget" in message
    assert "\n" not in message


def test_format_bytes_uses_binary_units():
    assert format_bytes(24 * 2**30) == "24.00 GiB"
    assert format_bytes(14_729_216) == "14.05 MiB"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(-2 * 2**20) == "-2.00 MiB"
    assert format_bytes(3 * 2**40) == "3.00 TiB"


def test_describe_size_says_both_conventions():
    assert describe_size(24 * 2**30) == "24.00 GiB (25.77 GB)"
    assert describe_size(24 * 10**9) == "22.35 GiB (24.00 GB)"
