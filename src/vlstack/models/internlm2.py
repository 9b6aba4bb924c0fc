"""The InternLM2 family, the LLM of InternVL2-2B/8B/26B and InternVL2.5-2B/8B/26B, InternVL3-9B (InternLM2,
InternLM2.5, InternLM3 in InternLM2's key layout): a Llama under other names, only in the original layout
(transformers has no InternLM2 class; its converter maps it to Llama, and so does `vlm.save`).

Its `attention.wqkv` packs q, k and v per KV head: for each KV head, the rows of its query heads, then of its key
head, then of its value head. It stays packed in memory (as the decoder's "grouped" `qkv_proj`, split by a view in
the forward), so that a LoRA adapter on `wqkv` applies to it as trained; `native_state` unpacks it into Llama's
q/k/v_proj for a transformers-native checkpoint.
"""

from __future__ import annotations

import torch

from ..config import TextConfig
from .llama import LanguageModel, base_config
from .llama import native_config as llama_native

MODEL_TYPE = "internlm2"
ARCHITECTURE = "InternLM2ForCausalLM"
# (the original layout's names, ours): whole dotted segments, under language_model.
RENAMES = (
    ("language_model.tok_embeddings", "language_model.embed_tokens"),
    ("language_model.output", "lm_head"),
    ("attention.wqkv", "self_attn.qkv_proj"),
    ("attention.wo", "self_attn.o_proj"),
    ("feed_forward.w1", "mlp.gate_proj"),
    ("feed_forward.w3", "mlp.up_proj"),
    ("feed_forward.w2", "mlp.down_proj"),
    ("attention_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
)
# PEFT's target names for this family (and the generic q/k/v ones) -> our language-model module names
LORA_ALIASES = {
    "wqkv": "qkv_proj",
    "wo": "o_proj",
    "w1": "gate_proj",
    "w3": "up_proj",
    "w2": "down_proj",
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
}
__all__ = ["LanguageModel", "native_config", "native_state", "read_config"]


def read_config(t: dict) -> TextConfig:
    bias = bool(t.get("bias", True))  # (the class default; released configs say false)
    return base_config(t, MODEL_TYPE, attention_bias=bias, o_bias=bias, qkv_layout="grouped")


def native_config(t: TextConfig) -> dict:
    """The transformers layout has no InternLM2: a Llama text_config, as transformers' converter writes."""
    return llama_native(t)


def unpack_qkv(w: torch.Tensor, t: TextConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """wqkv [(H + 2 Hkv) D, ...] (weight or bias) -> q [H D, ...], k, v [Hkv D, ...]."""
    kv, d = t.num_key_value_heads, t.head_dim
    g = w.reshape(kv, t.num_attention_heads // kv + 2, d, *w.shape[1:])
    return g[:, :-2].reshape(-1, *w.shape[1:]), g[:, -2].reshape(-1, *w.shape[1:]), g[:, -1].reshape(-1, *w.shape[1:])


def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t: TextConfig) -> torch.Tensor:
    """The inverse of unpack_qkv."""
    kv, d = t.num_key_value_heads, t.head_dim
    rest = q.shape[1:]
    groups = [q.reshape(kv, -1, d, *rest), k.reshape(kv, 1, d, *rest), v.reshape(kv, 1, d, *rest)]
    return torch.cat(groups, dim=1).reshape(-1, *rest)


def native_state(state: dict[str, torch.Tensor], t: TextConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> Llama's: each packed qkv_proj unpacked into q/k/v_proj."""
    out = {}
    for name, w in state.items():
        if ".self_attn.qkv_proj." in name:
            for part, x in zip(("q_proj", "k_proj", "v_proj"), unpack_qkv(w, t)):
                out[name.replace("qkv_proj", part)] = x
        else:
            out[name] = w
    return out
