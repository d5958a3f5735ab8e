"""Hardware profiles for the cost model: what a collective costs on each link class, with cited figures.

    load_profile("h800-ib400" | "cpu-gloo" | "shaped:20mbit" | "path/to/profile.json") --> HardwareProfile
        HardwareProfile: intra_node / inter_node LinkProfile (alpha s per call, alpha per peer, beta bytes/s),
                         host seconds per collective, fixed seconds per step, sources (URL + what it says)

A link class's beta is per rank (each GPU has its own NVLink ports and its own NIC), unless the class is
``shared_per_node``: one link per node carries all of its ranks' traffic (a veth pair, one NIC per node); then
the bottleneck is a node's summed bytes. A link also has a size on the wire beyond the payload: bytes per directed
message between two ranks (``message_overhead_bytes``: TCP/IP and gloo headers, gloo's receive-ready notice, ACKs;
a gloo all-to-all sends one to every peer, empty ones included) and per payload byte (``payload_overhead``:
segment headers and ACKs). A token-bucket link (tc tbf) has a ``burst_bytes`` bucket that refills while nothing
waits, so host/compute time between collectives is not lost to the link (cost_model.py).
A profile's ``step_fixed_s`` is the part of a step the link model cannot give (compute, host glue, per-call
latency); it is a measured calibration input (e.g. the same step on an unshaped link). A user profile (JSON, the
format ``to_dict`` writes) with a missing or negative figure is refused naming it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from placement.errors import InputError

DEEPEP_LEGACY = "https://github.com/deepseek-ai/DeepEP/blob/main/docs/legacy.md"


@dataclass(frozen=True, kw_only=True)
class LinkProfile:
    alpha_s: float                  # seconds per collective call on this link class
    beta_bytes_per_s: float         # bytes per second per rank (per node when shared_per_node)
    alpha_per_peer_s: float = 0.0   # extra seconds per peer of this class in the call (gloo's pairwise sends)
    shared_per_node: bool = False
    message_overhead_bytes: float = 0.0   # link bytes per directed message between two ranks, beside the payload
    payload_overhead: float = 0.0         # extra link bytes per payload byte (headers of full segments, ACKs)
    burst_bytes: float = 0.0              # token bucket depth (tc tbf's burst); 0: not a token-bucket link

    def __post_init__(self) -> None:
        for name in ("alpha_s", "alpha_per_peer_s", "beta_bytes_per_s", "message_overhead_bytes",
                     "payload_overhead", "burst_bytes"):
            _check_figure(name, getattr(self, name), positive=name == "beta_bytes_per_s")
        if not isinstance(self.shared_per_node, bool):
            raise InputError(f"shared_per_node must be true or false, got {self.shared_per_node!r}")

    def seconds(self, bottleneck_bytes: float, peers: int) -> float:
        return self.alpha_s + self.alpha_per_peer_s * peers + bottleneck_bytes / self.beta_bytes_per_s


@dataclass(frozen=True, kw_only=True)
class HardwareProfile:
    name: str
    intra_node: LinkProfile
    inter_node: LinkProfile
    host_s_per_collective: float = 0.0   # host time per collective call (Python glue, launch) beside the wire
    step_s: float = 0.0                  # fixed communication seconds per step (control messages)
    step_fixed_s: float = 0.0            # measured compute + host seconds per step beside the link (calibration)
    sources: tuple[dict, ...] = field(default_factory=tuple)   # {"url": ..., "says": ...} for every figure

    def __post_init__(self) -> None:
        for name in ("host_s_per_collective", "step_s", "step_fixed_s"):
            _check_figure(name, getattr(self, name))
        for src in self.sources:
            if not isinstance(src, dict) or not {"url", "says"} <= src.keys():
                raise InputError(f"hardware profile {self.name}: every source needs 'url' and 'says', got {src!r}")

    def to_dict(self) -> dict:
        link = lambda p: {"alpha_s": p.alpha_s, "alpha_per_peer_s": p.alpha_per_peer_s,  # noqa: E731
                          "beta_bytes_per_s": p.beta_bytes_per_s, "shared_per_node": p.shared_per_node,
                          "message_overhead_bytes": p.message_overhead_bytes, "payload_overhead": p.payload_overhead,
                          "burst_bytes": p.burst_bytes}
        return {"name": self.name, "intra_node": link(self.intra_node), "inter_node": link(self.inter_node),
                "host_s_per_collective": self.host_s_per_collective, "step_s": self.step_s,
                "step_fixed_s": self.step_fixed_s, "sources": list(self.sources)}

    @classmethod
    def from_dict(cls, d: dict, *, what: str = "hardware profile") -> "HardwareProfile":
        if not isinstance(d, dict):
            raise InputError(f"{what}: must be a JSON object, got {type(d).__name__}")
        links = {}
        for cls_name in ("intra_node", "inter_node"):
            sub = d.get(cls_name)
            if not isinstance(sub, dict):
                raise InputError(f"{what}: missing figure '{cls_name}' (an object with alpha_s and "
                                 f"beta_bytes_per_s)")
            for key in ("alpha_s", "beta_bytes_per_s"):
                if key not in sub:
                    raise InputError(f"{what}: missing figure '{cls_name}.{key}'")
            try:
                links[cls_name] = LinkProfile(alpha_s=sub["alpha_s"], beta_bytes_per_s=sub["beta_bytes_per_s"],
                                              alpha_per_peer_s=sub.get("alpha_per_peer_s", 0.0),
                                              shared_per_node=sub.get("shared_per_node", False),
                                              message_overhead_bytes=sub.get("message_overhead_bytes", 0.0),
                                              payload_overhead=sub.get("payload_overhead", 0.0),
                                              burst_bytes=sub.get("burst_bytes", 0.0))
            except InputError as exc:
                raise InputError(f"{what}: {cls_name}.{exc}") from None
        try:
            return cls(name=str(d.get("name", what)), **links,
                       host_s_per_collective=d.get("host_s_per_collective", 0.0), step_s=d.get("step_s", 0.0),
                       step_fixed_s=d.get("step_fixed_s", 0.0), sources=tuple(d.get("sources") or ()))
        except (InputError, TypeError) as exc:
            raise InputError(f"{what}: {exc}") from None


def _check_figure(name: str, value, *, positive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise InputError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


# ---- built-in profiles -----------------------------------------------------------------------------------
# cpu-gloo: measured by bench/calibrate_gloo.py; both classes are loopback TCP on one host.
_CPU_GLOO_LINK = LinkProfile(alpha_s=2049e-6, beta_bytes_per_s=482.6e6)
_CPU_GLOO_SOURCE = {"url": "bench/calibrate_gloo.py (bench/results/cpu_gloo_profile.md)",
                    "says": "measured 2026-12-02 on the 2-CPU x86_64 development VM, torch 2.13.0+cpu: gloo "
                            "all_to_all_single over loopback TCP at 4 ranks (1 thread each), median of 15 rounds "
                            "of 10 calls, per-peer sizes 64 B..1 MiB; fit t = alpha + bytes per rank / beta: "
                            "alpha 2049 us, beta 482.6 MB/s per rank (max relative error 10%). The VM was shared "
                            "(load average ~6 on 2 CPUs): 4 ranks wait to be scheduled, hence the large alpha "
                            "(2 ranks: 239 us, 606 MB/s). Recalibrate on your machine and pass --hardware PATH"}

# h800-ib400: 8 H800 per node over NVLink, one CX7 400 Gb/s InfiniBand NIC per GPU (DeepEP's testbed).
_H800 = HardwareProfile(
    name="h800-ib400",
    intra_node=LinkProfile(alpha_s=20e-6, beta_bytes_per_s=153e9),
    inter_node=LinkProfile(alpha_s=20e-6, beta_bytes_per_s=50e9),
    sources=(
        {"url": DEEPEP_LEGACY, "says": "normal kernels on H800 (~160 GB/s NVLink max), EP 8 intranode: dispatch "
                                       "153 GB/s, combine 158 GB/s bottleneck bandwidth (NVLink) -> intra beta "
                                       "153 GB/s per GPU"},
        {"url": DEEPEP_LEGACY, "says": "one CX7 InfiniBand 400 Gb/s NIC per H800 (~50 GB/s maximum); normal "
                                       "kernels internode: 43 (EP 16), 58 (EP 32), 51 (EP 64) GB/s RDMA "
                                       "bottleneck bandwidth -> inter beta 50 GB/s per GPU"},
        {"url": DEEPEP_LEGACY, "says": "low-latency kernels, 128 tokens x 7168 hidden, top-8: dispatch 118/155/173/"
                                       "192/194 us, combine 195/273/314/369/360 us at EP 16/32/64/128/256. alpha "
                                       "20 us = the intercept of one least-squares line through these 10 latencies "
                                       "against the bytes each rank sends to other nodes (128 x 8 x (1 - 8/EP) "
                                       "messages of 7392 B FP8 / 14336 B BF16; our fit, its slope 42 GB/s agrees "
                                       "with the NIC); used for both link classes (the kernels' fixed cost)"},
    ))


def _builtin() -> dict[str, HardwareProfile]:
    cpu = HardwareProfile(name="cpu-gloo", intra_node=_CPU_GLOO_LINK, inter_node=_CPU_GLOO_LINK,
                          sources=(_CPU_GLOO_SOURCE,))
    return {"cpu-gloo": cpu, "h800-ib400": _H800}


BUILTIN_NAMES = ("cpu-gloo", "h800-ib400", "shaped:RATE")
_RATE_UNITS = {"bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8,
               "bps": 1.0, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9}


def parse_rate(text: str) -> float:
    """A tc-style rate -> bytes per second: ``20mbit`` (bits/s; bit, kbit, mbit, gbit or a bare number) or
    ``5mbps`` (bytes/s, as tc reads bps, kbps, mbps, gbps)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([a-z]*)\s*", str(text).lower())
    if m is None or m.group(2) not in ("", *_RATE_UNITS):
        raise InputError(f"rate {text!r} is not a tc rate (e.g. 20mbit, 1gbit, 5mbps)")
    value = float(m.group(1)) * _RATE_UNITS.get(m.group(2) or "bit")
    if not value > 0:
        raise InputError(f"rate {text!r} must be > 0")
    return value


# A veth pair between two network namespaces, gloo over TCP, 2 ranks per node: measured by bench/link_overhead.py.
VETH_MESSAGE_OVERHEAD_BYTES = 399.0
VETH_PAYLOAD_OVERHEAD = 0.0153
TBF_BURST_BYTES = 16 * 1024         # launch/netns.py LinkShape's default burst
_VETH_SOURCE = {"url": "bench/link_overhead.py (bench/results/link_overhead.md)",
                "says": "measured 2026-12-02 on the 2-CPU development VM, torch 2.13.0+cpu gloo, 2 network "
                        "namespaces x 2 ranks, veth shaped with tbf 1 Mbit/s burst 16384 B on both ends: node 0's "
                        "veth counters (Ethernet frames, both directions) over 12 calls of each op; least squares "
                        "over all-to-alls (zero splits, one row of 256/2048/8192 B per peer, rows to same-node peers "
                        "only, 8 B equal splits): 399 B per cross-node directed message (an empty one included) + "
                        "1.0153 B per payload byte, max relative error 1.7% (unshaped: 395 B, 1.0055 B/B). A "
                        "broadcast of 256 B from rank 0 costs what 1.9 such messages do (gloo's binomial tree: 2 "
                        "cross the link), a 64 B all-gather 10.5 (gloo's ring: 2 x (G - 1) half-chunk messages on "
                        "each of the 2 crossing edges = 12). A call's time tracks its busiest direction's bytes / "
                        "rate (within 5-20% for the smallest calls)"}


def shaped_profile(rate_bytes_per_s: float, *, base: HardwareProfile | None = None,
                   step_fixed_s: float | None = None, burst_bytes: float = TBF_BURST_BYTES) -> HardwareProfile:
    """Two nodes joined by one link rate-limited with tc tbf (bench/shaped_link.py): the inter-node class is
    that link (shared by the node's ranks; TCP/gloo overhead per message and per byte as bench/link_overhead.py
    measured; a token bucket of ``burst_bytes``), everything else is ``base`` (default: cpu-gloo, this machine).

    ``step_fixed_s``: the measured compute + host seconds of a step (e.g. the same config's step on the unshaped
    link, which bench/shaped_link.py measures for its baseline). That measurement already holds every call's host
    and latency cost, so with it the profile's alphas and host time are zero and a step is that time plus the link's
    (minus what the bucket refills meanwhile); without it the alphas are base's (a ranking, not a step time)."""
    base = base or _builtin()["cpu-gloo"]
    inter = replace(base.inter_node, beta_bytes_per_s=rate_bytes_per_s, shared_per_node=True,
                    message_overhead_bytes=VETH_MESSAGE_OVERHEAD_BYTES, payload_overhead=VETH_PAYLOAD_OVERHEAD,
                    burst_bytes=burst_bytes)
    intra = base.intra_node
    rate = f"{rate_bytes_per_s * 8 / 1e6:g} Mbit/s"
    says = f"inter-node link = one veth pair shaped with tc tbf at {rate}, burst {burst_bytes:g} B (beta_inter, " \
           f"shared by each node's ranks); "
    extra = {}
    if step_fixed_s is not None:
        _check_figure("step_fixed_s", step_fixed_s)
        inter, intra = replace(inter, alpha_s=0.0, alpha_per_peer_s=0.0), replace(intra, alpha_s=0.0,
                                                                                 alpha_per_peer_s=0.0)
        extra = {"step_fixed_s": step_fixed_s, "host_s_per_collective": 0.0}
        says += (f"compute + host {step_fixed_s * 1e3:g} ms per step given by the caller (measured unshaped), "
                 f"alphas 0 (in that time); intra-node beta from {base.name}")
    else:
        says += f"alphas from {base.name}"
    return replace(base, name=f"shaped:{rate}", inter_node=inter, intra_node=intra, **extra,
                   sources=base.sources + (_VETH_SOURCE, {"url": "bench/shaped_link.py", "says": says}))


def load_profile(name_or_path: str) -> HardwareProfile:
    """A built-in profile by name, ``shaped:RATE`` (e.g. ``shaped:20mbit``), or a JSON file written in
    ``HardwareProfile.to_dict``'s format (e.g. by bench/calibrate_gloo.py). Unknown names are refused listing
    the known ones."""
    builtin = _builtin()
    if name_or_path in builtin:
        return builtin[name_or_path]
    if name_or_path.startswith("shaped:"):
        return shaped_profile(parse_rate(name_or_path.split(":", 1)[1]))
    path = Path(name_or_path)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise InputError(f"hardware profile file not found: {path}")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"hardware profile {path}: not valid JSON ({exc})") from None
        return HardwareProfile.from_dict(d, what=f"hardware profile {path}")
    raise InputError(f"unknown hardware {name_or_path!r} (known: {', '.join(BUILTIN_NAMES)}, or a profile "
                     f".json file)")
