"""The InternVL LLM families beyond what test_parity.py compares with transformers directly: InternLM2 (no
transformers class: checked against the same weights as Llama, its arithmetic, loaded from the original layout with
q/k/v packed into `wqkv` per KV head), and what every family shares: LoRA targets, adapters, errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DEVICE, greedy_ids, rel_err, to_original_layout, write_hf_checkpoint
from test_parity import PROMPTS, encode

import vlstack
from vlstack.errors import ConfigError

LLAMA = dict(tile=56, heads=4, kv_heads=2, tied=False, layers=2, text=dict(model_type="llama"))


@pytest.fixture(scope="module")
def internlm2(tmp_path_factory):
    """(transformers' Llama InternVL, vlstack on the same weights as InternLM2 in the original layout, their dirs)."""
    root = tmp_path_factory.mktemp("internlm2")
    hf = write_hf_checkpoint(root / "llama", **LLAMA).to(DEVICE)
    to_original_layout(root / "llama", root / "internlm2", internlm2=True)
    return hf, vlstack.load(root / "internlm2", device=DEVICE, dtype="float32"), root


def test_internlm2_checkpoint_is_packed_per_kv_head(internlm2):
    _, vlm, root = internlm2
    from safetensors import safe_open

    cfg = json.loads((root / "internlm2" / "config.json").read_text())["llm_config"]
    assert cfg["architectures"] == ["InternLM2ForCausalLM"] and vlm.cfg.text.model_type == "internlm2"
    with safe_open(str(root / "internlm2" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "language_model.model.layers.0.attention.wqkv.weight" in keys and "language_model.output.weight" in keys
    assert not any("q_proj" in k and k.startswith("language_model") for k in keys)


def test_internlm2_logits_and_greedy_tokens_match_llama(internlm2):
    hf, vlm, _ = internlm2
    for images, question in PROMPTS:
        inputs, _ = encode(vlm, images, question)
        ids, pixels = inputs["input_ids"], inputs.get("pixel_values")
        with torch.no_grad():
            ref = hf(input_ids=ids, pixel_values=pixels).logits
            extra = {"pixel_values": pixels} if pixels is not None else {}
            want = hf.generate(input_ids=ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, **extra)
        assert rel_err(vlm(ids, pixels), ref) <= 1e-4
        assert greedy_ids(vlm, [inputs], 8) == [want[0, ids.shape[1] :].tolist()]


def test_internlm2_read_as_a_plain_qkv_stack_gives_other_logits(internlm2):
    """The packing matters: reading wqkv as [Q; K; V] (as Phi-3 packs it) changes the logits far beyond 1e-4."""
    hf, vlm, _ = internlm2
    inputs, _ = encode(vlm, *PROMPTS[1])
    for layer in vlm.model.language_model.layers:
        layer.self_attn.layout = "stacked"
    try:
        with torch.no_grad():
            ref = hf(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
        assert rel_err(vlm(inputs["input_ids"], inputs["pixel_values"]), ref) > 1e-2
    finally:
        for layer in vlm.model.language_model.layers:
            layer.self_attn.layout = "grouped"


def test_internlm2_saves_as_llama_that_transformers_loads(internlm2, tmp_path):
    from transformers import InternVLForConditionalGeneration

    hf, vlm, _ = internlm2
    vlm.save(tmp_path / "saved")
    cfg = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert cfg["text_config"]["model_type"] == "llama"
    back = InternVLForConditionalGeneration.from_pretrained(tmp_path / "saved", dtype=torch.float32).to(DEVICE).eval()
    inputs, _ = encode(vlm, *PROMPTS[2])
    with torch.no_grad():
        a = back(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
        b = hf(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
    assert torch.equal(a, b)


def test_pack_and_unpack_are_inverse():
    from vlstack.config import TextConfig
    from vlstack.models.internlm2 import pack_qkv, unpack_qkv

    t = TextConfig(hidden_size=12, num_attention_heads=6, num_key_value_heads=2, head_dim=2)
    w = torch.arange((6 + 4) * 2 * 3, dtype=torch.float32).view(20, 3)
    q, k, v = unpack_qkv(w, t)
    assert q.shape == (12, 3) and k.shape == v.shape == (4, 3)
    # group 0 holds rows 0-9: query heads 0-2 (rows 0-5), key head 0 (rows 6-7), value head 0 (rows 8-9)
    assert torch.equal(q[:6], w[:6]) and torch.equal(k[:2], w[6:8]) and torch.equal(v[:2], w[8:10])
    assert torch.equal(pack_qkv(q, k, v, t), w)
    bias = torch.arange(20.0)
    assert torch.equal(pack_qkv(*unpack_qkv(bias, t), t), bias)


def test_unsupported_llms_are_named():
    from vlstack.config import parse_config

    raw = json.loads((vlstack.tiny.ASSETS / "config.json").read_text())
    for kind in ("qwen3_moe", "gpt_oss"):
        raw["text_config"]["model_type"] = kind
        with pytest.raises(ConfigError, match=f"language model '{kind}' is not supported"):
            parse_config(raw)
