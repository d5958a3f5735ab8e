"""Two nodes: two network namespaces joined by a veth pair, one ``epserve serve --nnodes 2`` in each (2 ranks
per node, 4 in all; coherent with the node-aware transport). A request to node 0's server, made inside its
namespace, is answered with the one-process tokens; stopping node 0 (Ctrl-C) ends both nodes cleanly; a cut link
ends both, each naming what it lost."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from comm.spawn import free_port
from launch.netns import NetnsUnavailable, TwoNodes
from tests.e2e.conftest import PROMPTS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MAX_TOKENS = 12


@pytest.fixture
def two_namespaces():
    """``[(netns, interface, address), (netns, interface, address)]``, removed afterwards whatever happened."""
    try:
        nodes = TwoNodes.create()
    except NetnsUnavailable as exc:
        pytest.skip(f"two-node test: {exc}")
    with nodes:
        yield [(n.netns, n.dev, n.addr) for n in nodes.nodes]


def test_two_nodes_answer_with_the_one_process_tokens(two_namespaces, serve, tokenizer, reference):
    (ns0, dev0, addr0), (ns1, dev1, _) = two_namespaces
    master_port, port = free_port(), free_port()
    common = ["--nnodes", "2", "--nproc-per-node", "2", "--master-addr", addr0, "--master-port", str(master_port),
              "--strategy", "coherent", "--transport", "node_aware", "--collective-timeout", "60"]
    # gloo picks its interface from the hostname by default, which is not reachable inside a namespace
    node1 = serve([*common, "--node-rank", "1"], netns=ns1, port=port, wait=False,
                  env={"GLOO_SOCKET_IFNAME": dev1})
    node0 = serve([*common, "--node-rank", "0"], netns=ns0, port=port, env={"GLOO_SOCKET_IFNAME": dev0})
    assert sorted(node0.rank_processes()) == [0, 1] and sorted(node1.rank_processes()) == [2, 3]

    body = {"model": "default_model", "prompt": PROMPTS[:4], "max_tokens": MAX_TOKENS, "temperature": 0}
    script = ("import httpx, json, sys; r = httpx.post(sys.argv[1], json=json.loads(sys.argv[2]), timeout=120); "
              "print(json.dumps({'status': r.status_code, 'body': r.json()}))")
    out = subprocess.run(["ip", "netns", "exec", ns0, sys.executable, "-c", script,
                          f"http://127.0.0.1:{port}/v1/completions", json.dumps(body)],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["status"] == 200, answer
    refs = reference(PROMPTS[:4], MAX_TOKENS)
    assert [c["text"] for c in answer["body"]["choices"]] == [tokenizer.decode(r) for r in refs]
    assert answer["body"]["usage"]["completion_tokens"] == sum(len(r) for r in refs)

    assert node0.stop(timeout_s=40) == 0, node0.log()[-3000:]
    assert node1.wait_exit(30) == 0, node1.log()[-3000:]
    assert node0.wait_all_gone(10) == [] and node1.wait_all_gone(10) == []


def test_a_cut_link_ends_both_nodes_naming_the_lost_peer(two_namespaces, serve):
    """The veth between the nodes goes down under load: node 0 ends its requests with an error naming node 1's
    ranks, node 1 says it lost node 0, and every process of both nodes is gone within the collective timeout
    + 10 s (never a hang)."""
    (ns0, dev0, addr0), (ns1, dev1, _) = two_namespaces
    master_port, port, timeout_s = free_port(), free_port(), 15
    common = ["--nnodes", "2", "--nproc-per-node", "2", "--master-addr", addr0, "--master-port", str(master_port),
              "--strategy", "two_a2a", "--collective-timeout", str(timeout_s)]
    node1 = serve([*common, "--node-rank", "1"], netns=ns1, port=port, wait=False, env={"GLOO_SOCKET_IFNAME": dev1})
    node0 = serve([*common, "--node-rank", "0"], netns=ns0, port=port, env={"GLOO_SOCKET_IFNAME": dev0})
    body = {"model": "default_model", "prompt": PROMPTS[:4], "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    script = ("import httpx, json, sys; r = httpx.post(sys.argv[1], json=json.loads(sys.argv[2]), timeout=120); "
              "print(json.dumps({'status': r.status_code, 'body': r.text[:400]}))")
    client = subprocess.Popen(["ip", "netns", "exec", ns0, sys.executable, "-c", script,
                               f"http://127.0.0.1:{port}/v1/completions", json.dumps(body)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3.0)                                   # the batch is decoding across both nodes
    subprocess.run(["ip", "netns", "exec", ns1, "ip", "link", "set", dev1, "down"], check=True)
    cut = time.monotonic()
    out, err = client.communicate(timeout=timeout_s + 60)
    answer = json.loads(out)
    assert answer["status"] >= 500 and "stopped answering" in answer["body"], answer
    assert not node0.wait_all_gone(max(0.0, cut + timeout_s + 10 - time.monotonic())), node0.log()[-3000:]
    assert not node1.wait_all_gone(max(0.0, cut + timeout_s + 10 - time.monotonic())), node1.log()[-3000:]
    assert "ranks 2, 3 (node 1) stopped answering" in node0.log(), node0.log()[-3000:]
    assert "lost contact with node 0" in node1.log(), node1.log()[-3000:]
