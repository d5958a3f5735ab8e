"""What one gloo collective puts on the inter-node link beyond its payload: bytes per cross-node message and per
payload byte (TCP/IP + gloo headers, ACKs), and how long it takes on a shaped link. The cost model's shaped
profile takes its per-message overhead from here (placement/hardware.py).

    two network namespaces joined by a veth pair (launch/netns.py), 2 gloo ranks per node (GLOO_SOCKET_IFNAME =
    the node's veth end), for each link (unshaped, then tbf RATE on both ends):
        for each op (below): warm-up, then
            bytes:  [barrier | settle | read veth counters | barrier | op x n | barrier | settle | read]
                    for n = 0 and n = REPS: (bytes(REPS) - bytes(0)) / REPS = the op's link bytes (both directions)
            time:   op back to back until tbf's bucket is empty, then timed on rank 0 over >= 4 buckets
    --> fit over the all-to-alls: link bytes per op = M x overhead + payload x (1 + per_byte)
        (M = cross-node directed messages: every ordered pair of ranks on different nodes, G x (G - P))
    --> the broadcast and the all-gather: how many cross-node messages their bytes imply
    --> OUT/link_overhead.json + link_overhead.md

Ops: all_to_all_single with all-zero splits; with one row of B bytes to each peer (B in --row-bytes); with rows
only to the same node's peers; with equal splits of 8 B (a counts exchange); broadcast of 256 B from rank 0;
all_gather_into_tensor of 64 B per rank. Needs root, iproute2 and tbf; skips (exit 0) saying why otherwise.

Run (root):  nice -n 10 python bench/link_overhead.py [--rate 1mbit] [--reps 12] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_io import LOCAL_OUT, OUT_HELP  # noqa: E402  (--out default: untracked)

from launch.netns import LinkShape, NetnsUnavailable, TwoNodes, format_rate, rate_argument, read_link_bytes  # noqa: E402

RANKS_PER_NODE = 2
WORLD = 2 * RANKS_PER_NODE
SETTLE_S = 0.3            # after an op, before reading the counters: delayed ACKs go out (Linux: <= 200 ms)
BCAST_BYTES, GATHER_BYTES, COUNTS_BYTES = 256, 64, 8


# ---- the ranks (inside the namespaces) ------------------------------------------------------------------------
def _ops(dist, torch, rank: int, row_sizes: list[int]) -> list[tuple[str, dict, object]]:
    """(name, facts, fn): facts = the payload crossing nodes per op (both directions) and its shape."""
    G, P = WORLD, RANKS_PER_NODE
    node = rank // P
    cross_pairs = G * (G - P)
    out = []

    def a2a(send_B: list[int], recv_B: list[int]):
        send, recv = torch.zeros(sum(send_B), dtype=torch.uint8), torch.empty(sum(recv_B), dtype=torch.uint8)
        return lambda: dist.all_to_all_single(recv, send, recv_B, send_B)

    out.append(("a2a_zero_splits", {"kind": "a2a", "cross_payload": 0, "messages": cross_pairs},
                a2a([0] * G, [0] * G)))
    for B in row_sizes:
        sizes = [0 if g == rank else B for g in range(G)]
        out.append((f"a2a_row_{B}B_each_peer", {"kind": "a2a", "cross_payload": cross_pairs * B,
                                               "messages": cross_pairs, "row_bytes": B}, a2a(sizes, sizes)))
    B = row_sizes[-1]
    same = [B if g // P == node and g != rank else 0 for g in range(G)]
    out.append((f"a2a_row_{B}B_same_node_only", {"kind": "a2a", "cross_payload": 0, "messages": cross_pairs,
                                                 "row_bytes": B}, a2a(same, same)))
    counts_send, counts_recv = torch.zeros(G, dtype=torch.int64), torch.empty(G, dtype=torch.int64)
    out.append(("a2a_equal_splits_8B", {"kind": "a2a", "cross_payload": cross_pairs * COUNTS_BYTES,
                                        "messages": cross_pairs, "row_bytes": COUNTS_BYTES},
                lambda: dist.all_to_all_single(counts_recv, counts_send)))
    frame = torch.zeros(BCAST_BYTES, dtype=torch.uint8)
    out.append((f"broadcast_{BCAST_BYTES}B", {"kind": "broadcast", "message_bytes": BCAST_BYTES},
                lambda: dist.broadcast(frame, src=0)))
    mine, gathered = torch.zeros(GATHER_BYTES, dtype=torch.uint8), torch.empty(G * GATHER_BYTES, dtype=torch.uint8)
    out.append((f"all_gather_{GATHER_BYTES}B", {"kind": "all_gather", "message_bytes": GATHER_BYTES},
                lambda: dist.all_gather_into_tensor(gathered, mine)))
    return out


def worker_main(spec: dict) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = spec["rank"]
    dist.init_process_group("gloo", init_method=f"tcp://{spec['addr']}:{spec['port']}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    counter = lambda: read_link_bytes(spec["dev"]) if rank == 0 else None  # noqa: E731  (rank 0: node 0's end)
    rows = []
    for name, facts, fn in _ops(dist, torch, rank, spec["row_sizes"]):
        reps = spec["reps"]
        fn()
        moved = {}
        for n in (0, reps):
            dist.barrier()
            if rank == 0:
                time.sleep(SETTLE_S)
            before = counter()
            dist.barrier()
            for _ in range(n):
                fn()
            dist.barrier()
            if rank == 0:
                time.sleep(SETTLE_S)
                moved[n] = counter() - before
        # time back-to-back calls after enough calls to empty tbf's bucket, over a window >= 4 buckets
        plan = torch.tensor([reps, reps])
        if rank == 0:
            d = {k: (getattr(moved[reps], k) - getattr(moved[0], k)) / reps for k in ("sent", "received")}
            busiest = max(1.0, d["sent"], d["received"])
            if spec["burst_bytes"]:
                plan[:] = torch.tensor([math.ceil(spec["burst_bytes"] / busiest) + 1,
                                        max(reps, math.ceil(4 * spec["burst_bytes"] / busiest))])
        dist.broadcast(plan, src=0)
        drain, timed = plan.tolist()
        for _ in range(drain):
            fn()
        t0 = time.perf_counter()
        for _ in range(timed):
            fn()
        seconds = (time.perf_counter() - t0) / timed
        dist.barrier()
        if rank == 0:
            rows.append({"op": name, **facts, "reps": reps, "sent_per_op": d["sent"],
                         "received_per_op": d["received"], "link_bytes_per_op": d["sent"] + d["received"],
                         "barriers_bytes": moved[0].total, "seconds_per_op": seconds, "timed_calls": timed})
    dist.destroy_process_group()
    if rank == 0:
        print(json.dumps(rows))


# ---- the driver -----------------------------------------------------------------------------------------------
def run_ranks(net: TwoNodes, args, port: int, burst_bytes: int) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    procs = []
    try:
        for rank in reversed(range(WORLD)):
            node = net.nodes[rank // RANKS_PER_NODE]
            spec = {"rank": rank, "addr": net.nodes[0].addr, "port": port, "dev": node.dev, "reps": args.reps,
                    "row_sizes": args.row_bytes, "burst_bytes": burst_bytes}
            procs.append(subprocess.Popen(
                net.exec_argv(rank // RANKS_PER_NODE, [sys.executable, str(Path(__file__).resolve()), "--worker",
                                                       json.dumps(spec)]),
                cwd=ROOT, env={**env, "GLOO_SOCKET_IFNAME": node.dev}, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, start_new_session=True))
        outs = [p.communicate(timeout=args.timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    bad = [(p.returncode, err.strip().splitlines()[-1:] or ["?"]) for p, (_, err) in zip(procs, outs)
           if p.returncode != 0]
    if bad:
        raise RuntimeError(f"link_overhead ranks failed: {bad}")
    return json.loads(outs[-1][0].strip().splitlines()[-1])   # rank 0 was started last


def fit(rows: list[dict], rate_bytes_s: float | None) -> dict:
    """Least squares over the all-to-alls: bytes = M x overhead + payload x (1 + per_byte). Then the messages
    the broadcast and all-gather imply, and (shaped) the time per op against the busiest direction / rate."""
    import numpy as np

    a2a = [r for r in rows if r["kind"] == "a2a"]
    A = np.array([[r["messages"], r["cross_payload"]] for r in a2a], dtype=float)
    y = np.array([r["link_bytes_per_op"] for r in a2a])
    (overhead, slope), *_ = np.linalg.lstsq(A, y, rcond=None)
    for r in a2a:
        r["fitted_bytes"] = float(overhead * r["messages"] + slope * r["cross_payload"])
    for r in rows:
        if r["kind"] != "a2a":
            per_message = overhead + slope * r["message_bytes"]
            r["implied_cross_messages"] = r["link_bytes_per_op"] / per_message
        if rate_bytes_s:
            busiest = max(r["sent_per_op"], r["received_per_op"])
            r["busiest_direction_s"] = busiest / rate_bytes_s
    return {"overhead_bytes_per_message": float(overhead), "bytes_per_payload_byte": float(slope),
            "per_byte_overhead": float(slope - 1.0),
            "max_relative_error": float(max(abs(r["fitted_bytes"] - r["link_bytes_per_op"])
                                            / max(1.0, r["link_bytes_per_op"]) for r in a2a))}


def markdown(result: dict) -> str:
    lines = ["# Link overhead of gloo collectives between two nodes", "", result["summary"], ""]
    for link in result["links"]:
        f = link["fit"]
        lines += [f"## {link['link']}", "",
                  f"Fit over the all-to-alls: **{f['overhead_bytes_per_message']:.0f} B per cross-node directed "
                  f"message** + **{f['bytes_per_payload_byte']:.4f} B per payload byte** (max relative error "
                  f"{f['max_relative_error']:.1%}).", "",
                  "| op | cross-node messages | cross-node payload B | link B/op 0->1 + 1->0 | fitted / implied "
                  "messages | ms/op | busiest direction / rate ms |", "|---|---|---|---|---|---|---|"]
        for r in link["rows"]:
            if r["kind"] == "a2a":
                fitted = f"{r['fitted_bytes']:.0f} B"
                msgs, payload = str(r["messages"]), str(r["cross_payload"])
            else:
                fitted = f"{r['implied_cross_messages']:.2f} messages of {r['message_bytes']} B"
                msgs, payload = "?", "?"
            busiest = f"{r['busiest_direction_s'] * 1e3:.2f}" if "busiest_direction_s" in r else "-"
            lines.append(f"| {r['op']} | {msgs} | {payload} | {r['sent_per_op']:.0f} + {r['received_per_op']:.0f} | "
                         f"{fitted} | {r['seconds_per_op'] * 1e3:.2f} | {busiest} |")
        lines.append("")
    lines += [result["notes"], ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--rate", type=rate_argument, default="1mbit", help="tbf rate on each veth end (default 1mbit, as "
                                                               "bench/shaped_link.py)")
    p.add_argument("--reps", type=int, default=12, help="calls per measurement (default 12)")
    p.add_argument("--row-bytes", type=int, nargs="+", default=[256, 2048, 8192],
                   help="row sizes of the one-row all-to-alls (default 256 2048 8192)")
    p.add_argument("--timeout", type=float, default=150.0, help="seconds per link setting at most")
    p.add_argument("--out", type=Path, default=LOCAL_OUT,
                   help=OUT_HELP)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    if args.reps < 1 or any(b < 1 for b in args.row_bytes):
        p.error("--reps and --row-bytes must be >= 1")
    shape = LinkShape(args.rate)
    try:
        net = TwoNodes.create_for(shape)
    except NetnsUnavailable as exc:
        print(f"link_overhead: skipped: {exc}")
        return 0
    links = []
    with net:
        port = 20000 + os.getpid() % 20000   # inside node 0's fresh namespace: nothing else listens there
        for shaped in (False, True):
            if shaped:
                net.shape(shape)
            t0 = time.perf_counter()
            rows = run_ranks(net, args, port + shaped, shape.burst_bytes if shaped else 0)
            rate = shape.rate_bit_s / 8 if shaped else None
            links.append({"link": f"shaped: {shape.describe()}" if shaped else "unshaped veth",
                          "rate_bytes_per_s": rate, "rows": rows, "fit": fit(rows, rate),
                          "wall_s": time.perf_counter() - t0})
            print(f"[link_overhead] {links[-1]['link']}: {json.dumps(links[-1]['fit'])} "
                  f"({links[-1]['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    shaped_fit = links[-1]["fit"]
    result = {
        "setup": {"world_size": WORLD, "ranks_per_node": RANKS_PER_NODE, "reps": args.reps,
                  "row_bytes": args.row_bytes, "rate_bit_s": shape.rate_bit_s, "tbf": shape.describe(),
                  "torch": __import__("torch").__version__},
        "links": links,
        "overhead_bytes_per_message": shaped_fit["overhead_bytes_per_message"],
        "bytes_per_payload_byte": shaped_fit["bytes_per_payload_byte"],
        "summary": (f"Two network namespaces joined by a veth pair, {RANKS_PER_NODE} gloo ranks per node "
                    f"(torch.distributed, GLOO_SOCKET_IFNAME = the node's veth end, OMP_NUM_THREADS=1), first "
                    f"unshaped, then with {shape.describe()} ({format_rate(shape.rate_bit_s)} each way). Bytes are "
                    f"node 0's veth counters (`ip -s -j link`: Ethernet frames, both directions) over {args.reps} "
                    f"calls minus the same bracket with none (its barriers), per call."),
        "notes": ("Columns: cross-node messages = ordered pairs of ranks on different nodes that an all-to-all "
                  f"connects ({WORLD} x {WORLD - RANKS_PER_NODE}), whatever their size (zero included); for the "
                  "broadcast and the all-gather the count is implied by their bytes and the fit (gloo's own "
                  "algorithms choose the pairs). ms/op: rank 0's wall time per call over back-to-back calls "
                  "(shaped: after enough calls to empty tbf's bucket, over at least 4 buckets' bytes); busiest "
                  "direction / rate: the larger of the two directions' bytes per call over the shaped rate."),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "link_overhead.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (args.out / "link_overhead.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
