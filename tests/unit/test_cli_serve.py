"""``epserve serve`` pre-flight (in this process: nothing may start on bad input) and the torchrun command line."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import psutil
import pytest

from launch import serve, serve_cmd
from launch.cli import build_parser, main
from placement import Placement
from placement.cluster import ClusterShape
from placement.placement import contiguous_placement

DEFAULT = serve_cmd.default_model_dir()   # Mixtral, 6 MoE layers x 16 experts, top-2


def _args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def _placement(path, *, layers=6, experts=16, gpus=4, solver=None):
    p = contiguous_placement(layers, experts, ClusterShape(nodes=1, gpus_per_node=gpus))
    Placement(p.expert_to_gpu_LE, p.cluster, solver=solver or {"name": "contiguous"}).save(path)
    return path


def _refused(capsys, *argv: str) -> str:
    """Run ``epserve serve argv`` here; it must exit 2 with one line and leave no child process behind."""
    before = {c.pid for c in psutil.Process().children(recursive=True)}
    assert main(["serve", *argv]) == 2
    assert {c.pid for c in psutil.Process().children(recursive=True)} == before
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("epserve serve: error: ")
    return err


def test_default_model_is_found_through_the_package():
    assert (DEFAULT / "config.json").is_file() and (DEFAULT / "tokenizer.json").is_file()
    pre = serve_cmd.preflight(_args("--nproc-per-node", "4"))
    assert pre.model_dir == DEFAULT
    assert pre.world_size == 4
    assert pre.placement.num_gpus == 4 and pre.placement.solver == {"name": "contiguous"}
    assert pre.placement.experts_on(1).tolist() == [[4, 5, 6, 7]] * 6
    assert pre.predictor_path is None


def test_placement_with_the_wrong_expert_count_is_refused(tmp_path, capsys):
    path = _placement(tmp_path / "p.json", experts=8)
    err = _refused(capsys, "--nproc-per-node", "4", "--placement", str(path))
    assert "placement is for 6 MoE layers x 8 experts, but the model (default_model) has 6 x 16" in err


def test_placement_for_another_gpu_count_is_refused(tmp_path, capsys):
    path = _placement(tmp_path / "p.json", gpus=4)
    err = _refused(capsys, "--nproc-per-node", "2", "--placement", str(path))
    assert "is for 4 GPUs, but --nnodes 1 x --nproc-per-node 2 = 2 ranks" in err


def test_unreadable_placement_is_refused(tmp_path, capsys):
    (tmp_path / "p.json").write_text("{not json")
    assert "not valid JSON" in _refused(capsys, "--placement", str(tmp_path / "p.json"))


def test_speculative_needs_a_predictor(tmp_path, capsys):
    err = _refused(capsys, "--nproc-per-node", "2", "--strategy", "speculative")
    assert "strategy speculative needs a predictor" in err
    path = _placement(tmp_path / "p.json", gpus=2, solver={"name": "local", "predictor": "p.predictor.npz"})
    err = _refused(capsys, "--nproc-per-node", "2", "--strategy", "speculative", "--placement", str(path))
    assert f"predictor file not found: {tmp_path / 'p.predictor.npz'}" in err


def test_experts_must_split_evenly_over_the_ranks(capsys):
    err = _refused(capsys, "--nproc-per-node", "3")
    assert "16 experts cannot be split evenly over 3 ranks" in err


@pytest.mark.parametrize("argv, message", [
    (["--collective-timeout", "inf"], "--collective-timeout must be a finite number of seconds > 0, got inf"),
    (["--collective-timeout", "0"], "--collective-timeout must be a finite number of seconds > 0, got 0.0"),
    (["--nproc-per-node", "0"], "--nproc-per-node must be >= 1, got 0"),
    (["--nnodes", "2", "--node-rank", "2", "--master-port", "29500"], "--node-rank 2 is not in [0, --nnodes 2)"),
    (["--nnodes", "2", "--node-rank", "1"], "--master-port is required with --nnodes > 1"),
    (["--port", "70000"], "--port 70000 is not a TCP port"),
    (["--kv-cache-tokens", "0"], "--kv-cache-tokens must be >= 1, got 0"),
    (["--max-model-len", "513"], "--max-model-len 513 exceeds the model's context (512 positions)"),
    (["--record-trace", "/no/such/dir/t.npz"], "--record-trace: directory does not exist: /no/such/dir"),
    (["--max-waiting", "0"], "--max-waiting must be >= 1, got 0"),
    (["--max-running", "64", "--max-batched-tokens", "32"], "--max-running (64) must be <= --max-batched-tokens (32)"),
    (["--max-running", "600"], "--max-running (600) must be <= --max-batched-tokens (512)"),
    (["--served-model-name", " "], "--served-model-name must not be empty"),
    (["--transport", "node_aware"], "--transport node_aware needs --nnodes >= 2"),
    (["--transport", "fixed", "--capacity", "0"], "--capacity must be >= 1 row per peer, got 0"),
    (["--capacity", "8"], "--capacity sizes the fixed transport's buffers; it does not apply to --transport a2a"),
    (["--strategy", "auto", "--hardware", "tpu-pod"], "unknown hardware 'tpu-pod' (known: cpu-gloo"),
    (["--transport", "auto", "--tokens-per-step", "0"], "--tokens-per-step must be >= 1, got 0"),
    (["--kv-cache-tokens", "10"], "--kv-cache-tokens 10 holds fewer tokens than one full-length sequence (512"),
    (["--drain-timeout", "-1"], "--drain-timeout must be a finite number of seconds >= 0, got -1.0"),
    (["--replace-every", "100", "--replace-window", "0"], "--replace-every needs a live routing window"),
    (["--attention", "tp", "--nproc-per-node", "8"], "--attention tp: num_attention_heads 4 cannot be split over 8"),
    (["--attention", "tp", "--strategy", "coherent"], "--attention tp serves --strategy two_a2a (tp_two_a2a) and speculative"),
    (["--attention", "tp", "--strategy", "speculative"], "strategy speculative needs a predictor"),
])
def test_bad_options_are_refused(argv, message, capsys):
    assert message in _refused(capsys, *argv)


def test_broken_checkpoints_are_refused(tmp_path, capsys):
    err = _refused(capsys, "--model", str(tmp_path / "absent"))
    assert f"checkpoint directory not found: {tmp_path / 'absent'}" in err

    bad = tmp_path / "bad"
    shutil.copytree(DEFAULT, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    assert f"{bad / 'model.safetensors'}: not a readable safetensors file" in _refused(capsys, "--model", str(bad))

    cfg = json.loads((DEFAULT / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, num_local_experts=8)))
    shutil.copy(DEFAULT / "model.safetensors", bad / "model.safetensors")
    assert "has shape [16, 128], the config implies [8, 128]" in _refused(capsys, "--model", str(bad))

    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
    assert "model_type" in _refused(capsys, "--model", str(bad))

    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "tokenizer.json").unlink()
    assert f"{bad}: no tokenizer.json" in _refused(capsys, "--model", str(bad))


def test_torchrun_command_line(tmp_path):
    path = _placement(tmp_path / "p.json", gpus=4)
    args = _args("--nproc-per-node", "2", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1",
                 "--master-port", "29555", "--placement", str(path), "--port", "8123", "--max-running", "7",
                 "--collective-timeout", "30", "--api-key", "sekrit")
    argv = serve_cmd.torchrun_argv(args, serve_cmd.preflight(args))
    head = argv[: argv.index("launch.serve") + 1]
    assert head[1:] == ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "2", "--node-rank", "1",
                        "--master-addr", "10.0.0.1", "--master-port", "29555", "--max-restarts", "0",
                        "--monitor-interval", "0.5", "--shutdown-timeout", str(serve_cmd.WORKER_SHUTDOWN_S),
                        "-m", "launch.serve"]
    assert "sekrit" not in " ".join(argv)
    assert serve_cmd.worker_env(args)[serve_cmd.API_KEY_ENV] == "sekrit"
    worker = serve.parse_args(argv[len(head):])
    assert (worker.model, worker.placement, worker.port, worker.max_running, worker.collective_timeout) == (
        str(DEFAULT), str(path), 8123, 7, 30.0)
    assert worker.strategy == "two_a2a" and worker.predictor is None and worker.max_waiting is None


def test_auto_choices_are_resolved_before_torchrun_and_the_workers_get_them(tmp_path):
    """--strategy/--transport auto run the cost model in the launcher; the workers get concrete names. On a
    shaped inter-node link node_aware (one crossing per node) must beat a2a for this top-2 model on 2x2."""
    args = _args("--nproc-per-node", "2", "--nnodes", "2", "--master-port", "29555", "--strategy", "two_a2a",
                 "--transport", "auto", "--hardware", "shaped:2mbit", "--port", "8125")
    pre = serve_cmd.preflight(args)
    assert pre.transport.value == "node_aware" and pre.strategy.value == "two_a2a"
    assert "node_aware has the lowest modelled communication time" in pre.why
    worker = serve.parse_args(serve_cmd.worker_argv(args, pre))
    assert (worker.strategy, worker.transport) == ("two_a2a", "node_aware")
    pre = serve_cmd.preflight(_args("--nproc-per-node", "4", "--strategy", "auto", "--port", "8125"))
    assert pre.strategy.value in ("two_a2a", "coherent") and pre.transport.value == "a2a" and pre.why
    # TP attention is priced too; its reduce-scatter + all-gather lose to the DP strategies on this model
    assert pre.attention == "dp" and "TP attention considered: tp_two_a2a" in pre.why
    assert serve.parse_args(serve_cmd.worker_argv(_args("--port", "8125"), pre)).attention == "dp"
    pre = serve_cmd.preflight(_args("--nproc-per-node", "4", "--strategy", "auto", "--attention", "tp",
                                    "--port", "8125"))
    assert (pre.strategy.value, pre.transport.value, pre.attention) == ("two_a2a", "a2a", "tp")
    assert "tp_two_a2a has the lowest modelled step among the TP strategies" in pre.why


def test_speculative_takes_the_predictor_the_placement_names(tmp_path):
    from placement.predictor import PredictorOptions, SpeculativePredictor
    from placement.trace import RoutingTrace

    rng = np.random.default_rng(0)
    T = 200
    experts_TLK = np.stack([rng.permutation(16)[:2] for _ in range(T * 6)]).reshape(T, 6, 2).astype(np.int16)
    trace = RoutingTrace(experts_TLK, np.full((T, 6, 2), 0.5, np.float32), 16,
                         rng.integers(0, 50, T).astype(np.int32))
    placement = contiguous_placement(6, 16, ClusterShape(nodes=1, gpus_per_node=2))
    SpeculativePredictor.build(trace, placement, PredictorOptions()).save(tmp_path / "p.predictor.npz")
    path = _placement(tmp_path / "p.json", gpus=2, solver={"name": "local", "predictor": "p.predictor.npz"})
    args = _args("--nproc-per-node", "2", "--strategy", "speculative", "--placement", str(path))
    pre = serve_cmd.preflight(args)
    assert pre.predictor_path == tmp_path / "p.predictor.npz"
    worker = serve.parse_args(serve_cmd.worker_argv(args, pre))
    assert worker.predictor == str(tmp_path / "p.predictor.npz") and worker.strategy == "speculative"
    # the two_a2a strategy does not take it
    assert serve_cmd.preflight(_args("--nproc-per-node", "2", "--placement", str(path))).predictor_path is None


def test_a_taken_port_is_refused_before_anything_starts(capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = _refused(capsys, "--port", str(port))
    assert f"cannot listen on 127.0.0.1:{port}" in err
    # another node's launcher does not serve: the port is not its business
    assert serve_cmd.preflight(_args("--port", str(port), "--nnodes", "2", "--node-rank", "1",
                                     "--master-port", "29500", "--nproc-per-node", "2")).world_size == 4


def test_engine_limits_reach_the_engine_config(tmp_path):
    args = _args("--max-running", "4", "--max-batched-tokens", "64", "--max-waiting", "3", "--max-model-len", "256",
                 "--served-model-name", "tiny-moe", "--record-trace", str(tmp_path / "live.npz"),
                 "--collective-timeout", "45")
    config = serve_cmd.engine_config(args, DEFAULT)
    assert (config.max_running_seqs, config.max_batched_tokens, config.max_waiting, config.max_model_len) == (
        4, 64, 3, 256)
    assert config.model_name == "tiny-moe" and config.record_trace_path == str(tmp_path / "live.npz")
    assert config.eos_token_ids == (1, 5) and config.stuck_after_s == 45
    default = serve_cmd.engine_config(_args(), DEFAULT)
    assert (default.model_name, default.max_model_len, default.record_trace_path) == ("default_model", 512, None)


@pytest.mark.parametrize("command, flag, shown", [
    ("serve", "--port", "(default: 8000)"), ("serve", "--node-rank", "(default: 0)"),
    ("serve", "--strategy", "(default: two_a2a)"), ("trace", "--batch-size", "(default: 16)"),
    ("batch", "--concurrency", "(default: 8)")])
def test_help_shows_defaults(capsys, command, flag, shown):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    options = " ".join(capsys.readouterr().out.split("options:")[1].split())
    help_text = re.search(rf" {flag} \S+ (.*?)(?= --|$)", options).group(1)
    assert help_text.endswith(shown)
    assert "(default: None)" not in options
