"""Two "nodes" on one machine: two network namespaces joined by a veth pair, optionally rate-limited, for the
two-node e2e test and the shaped-link benchmark.

    TwoNodes.create()  --ip netns add x2, ip link add veth pair, one end into each namespace, addresses, up-->
        .shape(rate)   --tc qdisc replace dev <each end> root tbf rate R burst B latency L-->  (both directions)
        .link_bytes()  --ip -n <node 0> -s -j link show <its end>-->  LinkBytes(sent 0->1, received 1->0)
        .close()       --ip netns del x2 (the veth pair goes with them)

Needs root, iproute2's ``ip`` and ``tc``, and a kernel with veth and the ``tbf`` qdisc; ``unavailable_reason()``
says in words which of them is missing (callers skip with it). Every address lives inside the namespaces made
here; nothing outside them is touched. Reading environment variables and running commands happens here, as for
the rest of launch/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

_TIMEOUT_S = 30
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(bit|bps)?\s*$", re.IGNORECASE)


class NetnsUnavailable(RuntimeError):
    """Namespaces, veth or tbf cannot be used on this machine; the message says why."""


@dataclass(frozen=True)
class Node:
    netns: str     # network namespace name
    dev: str       # this node's end of the veth pair (inside netns): set GLOO_SOCKET_IFNAME to it
    addr: str      # IPv4 address of dev (a /24 private to the pair)


@dataclass(frozen=True)
class LinkShape:
    """A token-bucket (tbf) limit on each end of the veth pair: every byte crossing between the nodes, in either
    direction, passes one bucket of ``rate_bit_s``."""

    rate_bit_s: int
    burst_bytes: int = 16 * 1024
    latency_ms: int = 2000        # queue bound of tbf (as time at the rate): large, so TCP is slowed, not dropped

    def __post_init__(self) -> None:
        for name in ("rate_bit_s", "burst_bytes", "latency_ms"):
            if getattr(self, name) <= 0:
                raise ValueError(f"link shape {name} must be positive, got {getattr(self, name)}")

    def tc_args(self) -> list[str]:
        return ["tbf", "rate", f"{self.rate_bit_s}bit", "burst", str(self.burst_bytes),
                "latency", f"{self.latency_ms}ms"]

    def describe(self) -> str:
        return (f"tbf rate {format_rate(self.rate_bit_s)} burst {self.burst_bytes} B latency {self.latency_ms} ms, "
                "on both veth ends")


@dataclass(frozen=True)
class LinkBytes:
    """Byte counters of node 0's veth end (the link has no other path): sent = node 0 -> node 1."""

    sent: int
    received: int

    @property
    def total(self) -> int:
        return self.sent + self.received

    def __sub__(self, other: "LinkBytes") -> "LinkBytes":
        return LinkBytes(self.sent - other.sent, self.received - other.received)


def rate_argument(text: str) -> int:
    """:func:`parse_rate` as an argparse ``type=`` (a bad rate is a usage error naming it)."""
    import argparse
    try:
        return parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_rate(text: str) -> int:
    """``"2mbit"`` / ``"500kbit"`` / ``"2000000"`` -> bits per second (tc's decimal units)."""
    m = _RATE.match(str(text))
    if not m:
        raise ValueError(f"rate {text!r}: expected a number with an optional k/m/g and 'bit', e.g. 2mbit")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]
    if (m.group(3) or "bit").lower() == "bps":
        value *= 8
    if value < 1:
        raise ValueError(f"rate {text!r} must be at least 1 bit/s")
    return int(value)


def format_rate(bit_s: int) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bit_s >= scale:
            return f"{bit_s / scale:g} {unit}"
    return f"{bit_s} bit/s"


def parse_link_stats(ip_json: str) -> LinkBytes:
    """The byte counters from ``ip -s -j link show dev X`` (one interface)."""
    doc = json.loads(ip_json)
    if len(doc) != 1:
        raise ValueError(f"expected one interface in the output of ip -s -j link, got {len(doc)}")
    stats = doc[0].get("stats64") or doc[0].get("stats")
    if not stats:
        raise ValueError("ip -s -j link gave no statistics")
    return LinkBytes(sent=int(stats["tx"]["bytes"]), received=int(stats["rx"]["bytes"]))


def read_link_bytes(dev: str, *, netns: str | None = None) -> LinkBytes:
    """Counters of interface ``dev`` (of namespace ``netns``; None: the caller's own namespace)."""
    return parse_link_stats(_run("ip", *(("-n", netns) if netns else ()), "-s", "-j", "link", "show", "dev", dev))


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (not root, no ip, no tc), or None. tbf is checked by shape()."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2")):
        if shutil.which(tool) is None:
            return f"the `{tool}` command ({package}) is not installed"
    return None


def _run(*argv: str) -> str:
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=_TIMEOUT_S)
    if out.returncode != 0:
        raise subprocess.CalledProcessError(out.returncode, argv, out.stdout, out.stderr)
    return out.stdout


def _describe(exc: Exception) -> str:
    if isinstance(exc, subprocess.CalledProcessError):
        return f"`{' '.join(exc.cmd)}` failed: {(exc.stderr or '').strip() or f'exit {exc.returncode}'}"
    return str(exc)


class TwoNodes:
    """Two namespaces and the veth pair between them; a context manager that always removes them."""

    def __init__(self, nodes: tuple[Node, Node]) -> None:
        self.nodes = nodes
        self.shape_applied: LinkShape | None = None
        self._made: list[str] = []   # namespaces this object made (and removes)

    @classmethod
    def create_for(cls, shape: "LinkShape") -> "TwoNodes":
        """:meth:`create`, then check that ``shape`` can be applied (tbf) and leave the link unshaped; raise
        NetnsUnavailable saying why not (nothing is left behind)."""
        net = cls.create()
        try:
            net.shape(shape)
            net.unshape()
        except BaseException:
            net.close()
            raise
        return net

    @classmethod
    def create(cls, tag: str | None = None) -> "TwoNodes":
        """Make the pair (names from ``tag``, default the process id); raise NetnsUnavailable saying why not."""
        reason = unavailable_reason()
        if reason:
            raise NetnsUnavailable(reason)
        pid = os.getpid()
        tag = tag or f"{pid % 100000}"
        subnet = f"10.{200 + pid % 50}.{pid % 250}"
        nodes = (Node(f"epn{tag}a", f"epv{tag}a", f"{subnet}.1"), Node(f"epn{tag}b", f"epv{tag}b", f"{subnet}.2"))
        made = cls(nodes)
        try:
            for n in nodes:
                _run("ip", "netns", "add", n.netns)
                made._made.append(n.netns)
            _run("ip", "link", "add", nodes[0].dev, "type", "veth", "peer", "name", nodes[1].dev)
            for n in nodes:
                _run("ip", "link", "set", n.dev, "netns", n.netns)
                _run("ip", "-n", n.netns, "addr", "add", f"{n.addr}/24", "dev", n.dev)
                _run("ip", "-n", n.netns, "link", "set", n.dev, "up")
                _run("ip", "-n", n.netns, "link", "set", "lo", "up")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            made.close()
            raise NetnsUnavailable(f"cannot make network namespaces here: {_describe(exc)}") from exc
        return made

    def __enter__(self) -> "TwoNodes":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def shape(self, shape: LinkShape) -> None:
        """Put ``shape``'s tbf on both ends (replacing any earlier one); NetnsUnavailable if tbf is refused."""
        try:
            for n in self.nodes:
                _run("tc", "-n", n.netns, "qdisc", "replace", "dev", n.dev, "root", *shape.tc_args())
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            raise NetnsUnavailable(f"the tbf qdisc is not available: {_describe(exc)}") from exc
        self.shape_applied = shape

    def unshape(self) -> None:
        """Remove the limits (both ends back to the veth default)."""
        for n in self.nodes:
            subprocess.run(["tc", "-n", n.netns, "qdisc", "del", "dev", n.dev, "root"], capture_output=True,
                           timeout=_TIMEOUT_S)
        self.shape_applied = None

    def qdisc(self, node: int = 0) -> str:
        """``tc qdisc show`` of one end, for the record."""
        n = self.nodes[node]
        return _run("tc", "-n", n.netns, "qdisc", "show", "dev", n.dev).strip()

    def link_bytes(self) -> LinkBytes:
        """Bytes node 0's end has sent and received so far (all traffic between the nodes)."""
        return read_link_bytes(self.nodes[0].dev, netns=self.nodes[0].netns)

    def exec_argv(self, node: int, argv: list[str]) -> list[str]:
        """``argv`` run inside node ``node``'s namespace."""
        return ["ip", "netns", "exec", self.nodes[node].netns, *argv]

    def close(self) -> None:
        for ns in self._made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=_TIMEOUT_S)
        self._made = []
