"""launch/netns.py's pure parts: tc rates, ``ip -s -j link`` counters, the shape's own checks."""

from __future__ import annotations

import json

import pytest

from launch.netns import LinkBytes, LinkShape, format_rate, parse_link_stats, parse_rate


def test_parse_rate_in_tc_units():
    assert parse_rate("2mbit") == 2_000_000
    assert parse_rate("500kbit") == 500_000
    assert parse_rate("1.5Mbit") == 1_500_000
    assert parse_rate("125kbps") == 1_000_000
    assert parse_rate("64000") == 64_000
    assert format_rate(2_000_000) == "2 Mbit/s"
    for bad in ("fast", "-1mbit", "0", "2 furlongs"):
        with pytest.raises(ValueError):
            parse_rate(bad)


def test_parse_link_stats_reads_both_directions():
    doc = [{"ifname": "epv1a", "stats64": {"rx": {"bytes": 1200, "packets": 3}, "tx": {"bytes": 3400, "packets": 5}}}]
    got = parse_link_stats(json.dumps(doc))
    assert got == LinkBytes(sent=3400, received=1200) and got.total == 4600
    assert got - LinkBytes(sent=400, received=200) == LinkBytes(sent=3000, received=1000)
    with pytest.raises(ValueError):
        parse_link_stats(json.dumps(doc * 2))


def test_link_shape_refuses_non_positive_figures():
    with pytest.raises(ValueError, match="rate_bit_s"):
        LinkShape(0)
    with pytest.raises(ValueError, match="burst_bytes"):
        LinkShape(1_000_000, burst_bytes=0)
