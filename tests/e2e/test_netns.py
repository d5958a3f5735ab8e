"""launch/netns.py on this machine (root): two namespaces joined by a veth pair carry TCP between their addresses;
the veth counters see every byte; a tbf shape on both ends holds a bulk transfer to its rate in each direction;
close() removes the namespaces."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from comm.spawn import free_port
from launch.netns import LinkShape, NetnsUnavailable, TwoNodes

PAYLOAD = 400_000   # bytes: 1.6 s at 2 Mbit/s, far under a millisecond unshaped

_SERVER = ("import socket, sys; s = socket.create_server((sys.argv[1], int(sys.argv[2]))); c, _ = s.accept(); "
           "n = 0\nwhile (b := c.recv(65536)): n += len(b)\nprint(n)")
_CLIENT = ("import socket, sys, time; c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20); "
           "t = time.perf_counter(); c.sendall(b'x' * int(sys.argv[3])); c.shutdown(socket.SHUT_WR); c.recv(1); "
           "print(time.perf_counter() - t)")


def _transfer(nodes: TwoNodes, src: int, dst: int, nbytes: int) -> tuple[int, float]:
    """Bytes node ``dst`` received over TCP from node ``src``, and the sender's seconds."""
    host, port = nodes.nodes[dst].addr, free_port()
    server = subprocess.Popen(nodes.exec_argv(dst, [sys.executable, "-c", _SERVER, host, str(port)]),
                              stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        sent = subprocess.run(nodes.exec_argv(src, [sys.executable, "-c", _CLIENT, host, str(port), str(nbytes)]),
                              capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        return int(server.communicate(timeout=30)[0]), float(sent.stdout)
    finally:
        server.kill()
        server.wait()


@pytest.mark.e2e
def test_shaped_veth_pair_counts_and_limits_both_directions():
    try:
        nodes = TwoNodes.create()
    except NetnsUnavailable as exc:
        pytest.skip(f"two-node namespaces: {exc}")
    names = [n.netns for n in nodes.nodes]
    with nodes:
        before = nodes.link_bytes()
        assert _transfer(nodes, 0, 1, PAYLOAD)[0] == PAYLOAD
        moved = nodes.link_bytes() - before
        assert PAYLOAD <= moved.sent < PAYLOAD * 1.1 and moved.received < PAYLOAD * 0.1

        try:
            nodes.shape(LinkShape(2_000_000))
        except NetnsUnavailable as exc:
            pytest.skip(str(exc))
        assert "tbf" in nodes.qdisc(0) and "tbf" in nodes.qdisc(1)
        for src, dst in ((0, 1), (1, 0)):
            got, seconds = _transfer(nodes, src, dst, PAYLOAD)
            assert got == PAYLOAD
            # the 16 KiB burst rides free; the rest goes at 2 Mbit/s (measured: 1.61 s each way)
            assert seconds > 0.9 * (PAYLOAD - 16 * 1024) * 8 / 2e6, seconds
            assert seconds < 1.5 * PAYLOAD * 8 / 2e6, seconds
        nodes.unshape()
        assert "tbf" not in nodes.qdisc(0)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)
