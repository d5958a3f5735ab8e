"""How `epserve serve` supervises its torchrun: signals to the workers (drain, stop, escalation), the workers'
stderr relayed (less torchrun's own ChildFailedError traceback), and one line when node 0 is gone.

    SIGTERM --> workers (rank 0 drains) --drain + STOP_GRACE_S--> SIGTERM torchrun --STOP_GRACE_S--> SIGKILL
    SIGINT  --> workers (rank 0 stops now); a second signal: SIGINT to the workers again; a third: escalate
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

STOP_GRACE_S = 20.0        # each step of a requested stop gets this long before the next, harder one


def say_if_node0_is_gone(host: str, port: int | None) -> None:
    """Nodes > 0, after torchrun failed: one line when node 0's rendezvous store no longer answers (its torchrun
    agent outlives its workers: no answer means node 0 or the link to it is down)."""
    if port is None:
        return
    try:
        socket.create_connection((host, port), timeout=3.0).close()
    except OSError as exc:
        print(f"epserve serve: lost contact with node 0 ({host}:{port} does not answer: {exc.strerror or exc}); "
              f"this node's ranks stopped", file=sys.stderr, flush=True)


def relay_stderr(stream) -> None:
    """torchrun's and the workers' stderr to ours, less torchrun's own Python traceback of ChildFailedError (the
    failure summary that follows it names the failed rank, and the workers' one-line messages say what was lost;
    any other traceback passes unchanged)."""
    out, held = sys.stderr.buffer, []
    for line in iter(stream.readline, b""):
        if not held and line.startswith(b"Traceback (most recent call last):"):
            held = [line]
            continue
        if held:
            held.append(line)
            if line.startswith((b" ", b"\t")):   # still inside the traceback
                continue
            out.write(line if b"ChildFailedError" in line else b"".join(held))
            held = []
        else:
            out.write(line)
        out.flush()
    out.write(b"".join(held))
    out.flush()


def forward_signals(child: subprocess.Popen, *, drain_s: float) -> threading.Event:
    """Stop in steps, each one bounded (torchrun runs in its own session: it never sees the terminal's signals,
    so it never raises its SignalException; the workers are told, and rank 0 ends the group):
    SIGTERM --> SIGTERM to the workers: rank 0 drains (503 to new requests, /health 503, the requests in flight
                finish for up to --drain-timeout), then stops the group; exit status 0
    SIGINT  --> SIGINT to the workers: rank 0 stops at once (requests in flight end with an error); status 0
    a second signal --> SIGINT to the workers (stop now)
    a third, or the first step's bound (drain + STOP_GRACE_S) --> SIGTERM to torchrun (it stops its workers;
    SIGKILL after WORKER_SHUTDOWN_S) --> STOP_GRACE_S later --> SIGKILL to torchrun (workers die with it)."""
    stop = threading.Event()
    received, escalated = [0], [0]

    def escalate() -> None:
        if child.poll() is not None or escalated[0] >= 2:
            return
        escalated[0] += 1
        _send(child, signal.SIGTERM if escalated[0] == 1 else signal.SIGKILL)
        _after(STOP_GRACE_S, escalate)

    def handler(sig, _frame) -> None:
        stop.set()
        received[0] += 1
        if received[0] == 1:
            _signal_workers(child, sig)
            _after(STOP_GRACE_S + (drain_s if sig == signal.SIGTERM else 0.0), escalate)
        elif received[0] == 2:
            _signal_workers(child, signal.SIGINT)
        else:
            escalate()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def _after(seconds: float, fn) -> None:
    timer = threading.Timer(seconds, fn)
    timer.daemon = True
    timer.start()


def _send(child: subprocess.Popen, sig: int) -> None:
    if child.poll() is None:
        try:
            child.send_signal(sig)
        except ProcessLookupError:
            pass


def _signal_workers(child: subprocess.Popen, sig: int) -> None:
    """``sig`` to torchrun's children (the workers, each in its own session); torchrun itself if none found."""
    pids = []
    for children in Path(f"/proc/{child.pid}/task").glob("*/children"):
        try:
            pids += [int(p) for p in children.read_text().split()]
        except OSError:
            continue
    if not pids:
        _send(child, sig)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
