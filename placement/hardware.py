"""Hardware profiles for the cost model: what a collective costs on each link class, with cited figures.

    load_profile("h800-ib400" | "cpu-gloo" | "shaped:20mbit" | "path/to/profile.json") --> HardwareProfile
        HardwareProfile: intra_node / inter_node LinkProfile (alpha s per call, alpha per peer, beta bytes/s),
                         host seconds per collective, fixed seconds per step, sources (URL + what it says)

A link class's beta is per rank (each GPU has its own NVLink ports and its own NIC), unless the class is
``shared_per_node``: one link per node carries all of its ranks' traffic (a veth pair, one NIC per node); then
the bottleneck is a node's summed bytes. A user profile (JSON, the format ``to_dict`` writes) with a missing or
negative figure is refused naming it.
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

    def __post_init__(self) -> None:
        for name in ("alpha_s", "alpha_per_peer_s", "beta_bytes_per_s"):
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
    sources: tuple[dict, ...] = field(default_factory=tuple)   # {"url": ..., "says": ...} for every figure

    def __post_init__(self) -> None:
        for name in ("host_s_per_collective", "step_s"):
            _check_figure(name, getattr(self, name))
        for src in self.sources:
            if not isinstance(src, dict) or not {"url", "says"} <= src.keys():
                raise InputError(f"hardware profile {self.name}: every source needs 'url' and 'says', got {src!r}")

    def to_dict(self) -> dict:
        link = lambda p: {"alpha_s": p.alpha_s, "alpha_per_peer_s": p.alpha_per_peer_s,  # noqa: E731
                          "beta_bytes_per_s": p.beta_bytes_per_s, "shared_per_node": p.shared_per_node}
        return {"name": self.name, "intra_node": link(self.intra_node), "inter_node": link(self.inter_node),
                "host_s_per_collective": self.host_s_per_collective, "step_s": self.step_s,
                "sources": list(self.sources)}

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
                                              shared_per_node=sub.get("shared_per_node", False))
            except InputError as exc:
                raise InputError(f"{what}: {cls_name}.{exc}") from None
        try:
            return cls(name=str(d.get("name", what)), **links,
                       host_s_per_collective=d.get("host_s_per_collective", 0.0), step_s=d.get("step_s", 0.0),
                       sources=tuple(d.get("sources") or ()))
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


def shaped_profile(rate_bytes_per_s: float, *, base: HardwareProfile | None = None) -> HardwareProfile:
    """Two nodes joined by one link rate-limited with tc tbf (bench/shaped_link.py): the inter-node class is
    that link (shared by the node's ranks), everything else is ``base`` (default: cpu-gloo, this machine)."""
    base = base or _builtin()["cpu-gloo"]
    inter = replace(base.inter_node, beta_bytes_per_s=rate_bytes_per_s, shared_per_node=True)
    rate = f"{rate_bytes_per_s * 8 / 1e6:g} Mbit/s"
    return replace(base, name=f"shaped:{rate}", inter_node=inter, sources=base.sources + (
        {"url": "bench/shaped_link.py",
         "says": f"inter-node link = one veth pair shaped with tc tbf at {rate} (beta_inter, shared by each node's "
                 f"ranks); alphas from {base.name}"},))


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
