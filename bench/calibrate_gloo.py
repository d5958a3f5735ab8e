"""Calibrate the ``cpu-gloo`` hardware profile: time gloo's all_to_all_single on this machine and fit alpha, beta.

    for G in (2, 4): spawn G gloo ranks (comm.spawn.spawn_ranks, one thread each)
        `rounds` times, for each per-peer size s (bounded list): barrier; time `reps` calls of all_to_all_single
        with s bytes to every peer; a call's time = the slowest rank's mean, the median over rounds
    --> per G, least squares (relative):  t = alpha + bytes_per_rank / beta,
        bytes_per_rank = (G - 1) x s (what one rank sends, = what it receives)
    --> JSON profile from the fit at --profile-world-size (default: the largest; placement/hardware.py's format,
        load it with --hardware PATH) + a markdown table of every fit and measurement

Every rank of this machine talks over loopback TCP, so the intra-node and inter-node classes get the same figures.
On a machine with fewer cores than ranks the fixed cost grows with the world size (ranks wait to be scheduled),
which one alpha per world size captures and a per-peer term does not: calibrate at the world size you model.
Run:  nice -n 10 python bench/calibrate_gloo.py [--out bench/results/cpu_gloo_profile.json]   (default: under
      bench/results/local/, untracked; that --out rewrites the tracked profile)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_io import LOCAL_OUT  # noqa: E402  (--out default: untracked)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from comm.spawn import spawn_ranks  # noqa: E402
from placement.hardware import HardwareProfile, LinkProfile  # noqa: E402

PER_PEER_BYTES = (64, 1 << 10, 8 << 10, 64 << 10, 256 << 10, 1 << 20)


def _time_rank(topology, sizes: tuple[int, ...], reps: int, rounds: int) -> dict[int, list[float]]:
    """Per size: the mean seconds of one all_to_all_single, for each round (this rank's clock)."""
    G, group = topology.world_size, topology.group
    out: dict[int, list[float]] = {size: [] for size in sizes}
    bufs = {size: (torch.ones(G * (size // 4)), torch.empty(G * (size // 4))) for size in sizes}
    for send, recv in bufs.values():
        dist.all_to_all_single(recv, send, group=group)          # warm-up
    for _ in range(rounds):             # rounds outside sizes: a burst of load from elsewhere hits every size
        for size, (send, recv) in bufs.items():
            dist.barrier(group=group)
            start = time.perf_counter()
            for _ in range(reps):
                dist.all_to_all_single(recv, send, group=group)
            out[size].append((time.perf_counter() - start) / reps)
    return out


def measure(world_sizes: tuple[int, ...], sizes: tuple[int, ...], reps: int, rounds: int) -> list[dict]:
    rows = []
    for G in world_sizes:
        per_rank = spawn_ranks(_time_rank, G, (sizes, reps, rounds), timeout_s=600)
        for size in sizes:
            slowest = [max(r[size][i] for r in per_rank) for i in range(rounds)]
            rows.append({"world_size": G, "per_peer_bytes": size, "bytes_per_rank": (G - 1) * size,
                         "seconds": statistics.median(slowest), "min_seconds": min(slowest), "rounds": slowest})
    return rows


def fit(rows: list[dict]) -> dict:
    """Least squares (relative errors: sizes span 4 decades) t = alpha + bytes_per_rank / beta, non-negative."""
    from scipy.optimize import nnls
    A = np.array([[1.0, r["bytes_per_rank"]] for r in rows])
    t = np.array([r["seconds"] for r in rows])
    scale = A.max(axis=0)
    coef, _ = nnls(A / scale / t[:, None], np.ones_like(t))
    coef = coef / scale
    pred = A @ coef
    for r, p in zip(rows, pred):
        r["fitted_seconds"] = float(p)
    if coef[1] <= 0:
        raise RuntimeError("the fit found no bandwidth term (time does not grow with bytes): rerun on a quieter "
                           "machine")
    return {"world_size": rows[0]["world_size"], "alpha_s": float(coef[0]), "beta_bytes_per_s": float(1 / coef[1]),
            "max_relative_error": float(np.max(np.abs(pred - t) / t))}


def profile(figures: dict, when: str) -> HardwareProfile:
    link = LinkProfile(alpha_s=figures["alpha_s"], beta_bytes_per_s=figures["beta_bytes_per_s"])
    machine = f"{platform.node()} ({platform.machine()}, {_cpus()} CPUs), torch {torch.__version__}"
    return HardwareProfile(name="cpu-gloo", intra_node=link, inter_node=link, sources=(
        {"url": "bench/calibrate_gloo.py", "says": f"measured {when} on {machine}: gloo all_to_all_single over "
                                                   f"loopback TCP at {figures['world_size']} ranks, median of "
                                                   f"rounds, fitted alpha + bytes/beta (max relative error "
                                                   f"{figures['max_relative_error']:.0%})"},))


def _cpus() -> int:
    import os
    return len(os.sched_getaffinity(0))


def write(out: Path, rows: list[dict], fits: list[dict], prof: HardwareProfile) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**prof.to_dict(), "calibration": {"fits": fits, "rows": rows}}, indent=1) + "\n")
    md = out.with_suffix(".md")
    lines = ["# cpu-gloo calibration", "", prof.sources[0]["says"], "",
             "| ranks | alpha (us) | beta (MB/s per rank) | max relative error |", "|--|--|--|--|"]
    lines += [f"| {f['world_size']} | {f['alpha_s'] * 1e6:.1f} | {f['beta_bytes_per_s'] / 1e6:.1f} | "
              f"{f['max_relative_error']:.0%} |" for f in fits]
    lines += ["", "| ranks | bytes per peer | bytes per rank | median (us) | min (us) | fitted (us) |",
              "|--|--|--|--|--|--|"]
    lines += [f"| {r['world_size']} | {r['per_peer_bytes']} | {r['bytes_per_rank']} | {r['seconds'] * 1e6:.1f} | "
              f"{r['min_seconds'] * 1e6:.1f} | {r['fitted_seconds'] * 1e6:.1f} |" for r in rows]
    md.write_text("\n".join(lines) + "\n")
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=LOCAL_OUT / "cpu_gloo_profile.json",
                        help="profile JSON to write, the .md beside it (default "
                             "bench/results/local/cpu_gloo_profile.json, untracked; "
                             "--out bench/results/cpu_gloo_profile.json rewrites the tracked one)")
    parser.add_argument("--reps", type=int, default=10, help="calls per timed round")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per size (median taken)")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--profile-world-size", type=int,
                        help="the world size whose fit becomes the profile (default: the largest measured)")
    args = parser.parse_args(argv)
    if args.profile_world_size not in (None, *args.world_sizes):
        parser.error(f"--profile-world-size must be one of --world-sizes {args.world_sizes}")
    when = datetime.date.today().isoformat()
    rows = measure(tuple(args.world_sizes), PER_PEER_BYTES, args.reps, args.rounds)
    fits = [fit([r for r in rows if r["world_size"] == G]) for G in args.world_sizes]
    chosen = next(f for f in fits if f["world_size"] == (args.profile_world_size or max(args.world_sizes)))
    prof = profile(chosen, when)
    md = write(args.out, rows, fits, prof)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
