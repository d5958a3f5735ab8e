"""The loader reads exactly the tensors a rank needs, and the experts it loads behave as in the full model."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from epserve.model import ExpertNotLoadedError, ModelFamily, load_model, sum_in_k_order
from placement.errors import PlacementError


def raw_header(file: Path) -> dict:
    """The safetensors JSON header read by hand: name -> {dtype, shape, data_offsets}."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def stored_bytes(header: dict, names) -> int:
    return sum(header[n]["data_offsets"][1] - header[n]["data_offsets"][0] for n in names)


def is_expert_of(name: str, layer: int, experts) -> bool:
    return any(f"layers.{layer}.block_sparse_moe.experts.{e}." in name for e in experts)


def test_subset_reads_exactly_the_selected_experts(tiny_checkpoint):
    ckpt = tiny_checkpoint(ModelFamily.MIXTRAL)
    file = ckpt / "model.safetensors"
    header = raw_header(file)
    pick = {0: [1, 5], 1: [0, 2, 7]}
    model, report = load_model(ckpt, experts=pick)

    expert_names = [n for n in header if ".experts." in n]
    chosen = [n for n in expert_names if any(is_expert_of(n, l, ids) for l, ids in pick.items())]
    assert len(expert_names) == 2 * 8 * 3 and len(chosen) == 5 * 3
    assert report.expert_bytes == stored_bytes(header, chosen) == 5 * 3 * 48 * 32 * 4
    assert report.other_bytes == stored_bytes(header, set(header) - set(expert_names))
    assert report.expert_tensors_read == 15
    assert report.tensors_read == 15 + len(header) - len(expert_names)
    assert model.loaded_experts == {0: (1, 5), 1: (0, 2, 7)}
    assert model.layers[1].mlp.expert_ids == (0, 2, 7)
    assert model.layers[1].mlp.experts.gate_up_proj.shape == (3, 2 * 48, 32)   # stacked, gate rows first

    # a full load reads every byte of tensor data in the file, once
    _, full = load_model(ckpt)
    (n,) = struct.unpack("<Q", file.read_bytes()[:8])
    assert full.total_bytes == file.stat().st_size - 8 - n
    assert full.expert_bytes == stored_bytes(header, expert_names)


def test_unselected_experts_are_never_used(tiny_checkpoint, tmp_path):
    """Poison every expert a rank does not hold with NaN: its load is unaffected (a full load is not)."""
    ckpt = shutil.copytree(tiny_checkpoint(ModelFamily.QWEN2_MOE), tmp_path / "ckpt")
    original, _ = load_model(ckpt)
    pick = {0: [3, 4], 1: [0, 1, 6]}  # MoE layer 1 is decoder layer 2 (layer 1 is dense)
    tensors = load_file(ckpt / "model.safetensors")
    moe_layer_of = {0: 0, 2: 1}
    for name in tensors:
        parts = name.split(".")
        if ".mlp.experts." in name and int(parts[5]) not in pick[moe_layer_of[int(parts[2])]]:
            tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})

    model, _ = load_model(ckpt, experts=pick)
    for mi, block in enumerate(model.moe_blocks()):
        for e in pick[mi]:
            for p_name, p in block.experts.expert_weights(e).items():
                assert torch.equal(p, original.moe_blocks()[mi].experts.expert_weights(e)[p_name])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    poisoned, _ = load_model(ckpt)
    assert not all(torch.isfinite(p).all() for p in poisoned.parameters())


def test_ranks_partial_outputs_add_up_to_the_one_process_bits(tiny_checkpoint):
    """Two ranks with complementary experts: their per-k outputs, summed in k order, equal the full model's
    MoE output exactly; a rank asked for an expert it lacks names it."""
    ckpt = tiny_checkpoint(ModelFamily.MIXTRAL)
    full, _ = load_model(ckpt)
    rank0, _ = load_model(ckpt, experts={0: [0, 2, 4, 6], 1: [0, 1, 2, 3]})
    rank1, _ = load_model(ckpt, experts={0: [1, 3, 5, 7], 1: [4, 5, 6, 7]})
    x_ND = torch.randn(40, 32, generator=torch.Generator().manual_seed(0))
    for mi in range(2):
        blocks = [m.moe_blocks()[mi] for m in (full, rank0, rank1)]
        w_NK, ids_NK = blocks[0].router.route(x_ND)
        held = [torch.isin(ids_NK, torch.tensor(b.expert_ids)) for b in blocks[1:]]
        parts = [b.weighted_expert_outputs(x_ND, ids_NK, w_NK, use) for b, use in zip(blocks[1:], held)]
        assert torch.equal(sum_in_k_order(parts[0] + parts[1]), blocks[0](x_ND))
        blocks[1].check_loaded(ids_NK, held[0])   # debug check: passes where every used expert is held
        with pytest.raises(ExpertNotLoadedError, match=r"MoE layer \d \(decoder layer \d\): expert \d is needed "
                                                       r"but not loaded"):
            blocks[1].check_loaded(ids_NK, torch.ones_like(held[0]))


def test_fused_layout_loads_the_same_weights_and_counts_slices(tiny_checkpoint):
    per_expert = tiny_checkpoint(ModelFamily.QWEN3_MOE, seed=7)
    fused = tiny_checkpoint(ModelFamily.QWEN3_MOE, seed=7, fused_experts=True)
    header = raw_header(fused / "model.safetensors")
    assert "model.layers.0.mlp.experts.gate_up_proj" in header
    assert not any(".experts.0." in n for n in header)
    a, _ = load_model(per_expert)
    b, report = load_model(fused, experts={0: [6], 1: [1, 2]})
    for mi, ids in {0: [6], 1: [1, 2]}.items():
        for e in ids:
            for p_name, p in b.moe_blocks()[mi].experts.expert_weights(e).items():
                assert torch.equal(p, a.moe_blocks()[mi].experts.expert_weights(e)[p_name])
    # 3 experts x (gate_up [48, 32] + down [32, 24]) float32, read as one slice per fused tensor
    assert report.expert_bytes == 3 * (48 * 32 + 32 * 24) * 4
    assert report.expert_tensors_read == 3 * 2


def test_sharded_checkpoint_dtype_device_and_tied_embeddings(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt = tiny_checkpoint(ModelFamily.QWEN3_MOE, tie_word_embeddings=True, mlp_only_layers=[0])
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(ckpt).save_pretrained(sharded, max_shard_size="40KB")
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 2 and (sharded / "model.safetensors.index.json").is_file()
    # a file in another naming beside the shards (hub repos carry e.g. consolidated.safetensors) is not read
    save_file({"layers.0.attention.wq.weight": torch.zeros(2, 2)}, sharded / "consolidated.safetensors")
    assert not any("lm_head.weight" in raw_header(sharded / f) for f in files)
    one, r1 = load_model(ckpt)
    many, r2 = load_model(sharded, dtype=torch.bfloat16, device="cpu")
    assert [Path(f).name for f in r2.files] == files
    assert (r1.expert_bytes, r1.other_bytes) == (r2.expert_bytes, r2.other_bytes)
    assert many.lm_head.weight is many.embed_tokens.weight
    assert {p.dtype for p in many.parameters()} == {torch.bfloat16}
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.allclose(many.forward_full(ids).float(), one.forward_full(ids), atol=0.1)


def test_bad_expert_selection_is_refused(tiny_checkpoint):
    ckpt = tiny_checkpoint(ModelFamily.MIXTRAL)
    with pytest.raises(PlacementError, match=r"MoE layer index 2 out of range \[0, 2\)"):
        load_model(ckpt, experts={2: [0]})
    with pytest.raises(PlacementError, match=r"MoE layer 0: \[3, 8\] must be distinct ids in \[0, 8\)"):
        load_model(ckpt, experts={0: [8, 3]})
