"""The MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) and checkpoint loading. See DESIGN.md "epserve/"."""

from epserve.model.config import CheckpointError, ModelConfig, ModelFamily, QKNorm
from epserve.model.layers import Attention, DenseMLP, ExpertMLP, RMSNorm, RotaryEmbedding, apply_rotary, attend
from epserve.model.loader import LoadReport, hub_tensor_shapes, load_model
from epserve.model.model import DecoderLayer, MoEModel
from epserve.model.moe import ExpertNotLoadedError, MoEBlock, Router, sum_in_k_order

__all__ = ["Attention", "CheckpointError", "DecoderLayer", "DenseMLP", "ExpertMLP", "ExpertNotLoadedError",
           "LoadReport", "ModelConfig", "ModelFamily", "MoEBlock", "MoEModel", "QKNorm", "RMSNorm", "Router",
           "RotaryEmbedding", "apply_rotary", "attend", "hub_tensor_shapes", "load_model", "sum_in_k_order"]
