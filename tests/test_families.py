"""The InternVL LLM families beyond what test_parity.py compares with transformers directly: InternLM2 (no
transformers class: checked against the same weights as Llama, its arithmetic, loaded from the original layout with
q/k/v packed into `wqkv` per KV head), and what every family shares: LoRA targets, adapters, errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DEVICE, greedy_ids, rel_err, to_original_layout, write_hf_checkpoint
from test_parity import PROMPTS, assert_saved_loads_in_transformers, encode

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
    hf, vlm, _ = internlm2
    assert_saved_loads_in_transformers(hf, vlm, tmp_path / "saved")
    cfg = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert cfg["text_config"]["model_type"] == "llama"


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
    from vlstack.models.config_json import parse_config

    raw = json.loads((vlstack.tiny.ASSETS / "config.json").read_text())
    for kind in ("qwen3_moe", "gpt_oss"):
        raw["text_config"]["model_type"] = kind
        with pytest.raises(ConfigError, match=f"language model '{kind}' is not supported"):
            parse_config(raw)


FAMILY_SHAPES = {  # family -> (shape, PEFT's LLM target names for it)
    "llama": (LLAMA, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "phi3": (
        dict(tile=56, text=dict(model_type="phi3", pad_token_id=0)),
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    ),
    "qwen3": (dict(tile=56, text=dict(model_type="qwen3", head_dim=24)), ["q_proj", "v_proj", "o_proj", "up_proj"]),
}


@pytest.mark.parametrize("kind", list(FAMILY_SHAPES))
def test_peft_adapters_work_both_ways_on_each_family(kind, tmp_path):
    """An adapter peft made on the family's transformers model loads in vlstack with the same logits; one vlstack
    makes with its default targets (the generic names, which on Phi-3 mean its fused layers) loads in peft."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from test_lora import inputs, randomise_adapter
    from transformers import InternVLForConditionalGeneration

    from vlstack.adapters import save_adapter
    from vlstack.layers.lora import LoRASpec, add_adapter

    shape, targets = FAMILY_SHAPES[kind]
    write_hf_checkpoint(tmp_path / "base", **shape)
    hf = InternVLForConditionalGeneration.from_pretrained(tmp_path / "base").to(DEVICE).eval()
    pattern = r".*language_model.*\.(" + "|".join(targets) + ")"
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=pattern))
    randomise_adapter([p for n, p in peft_model.named_parameters() if "lora_" in n], seed=3)
    peft_model.save_pretrained(tmp_path / "peft")
    vlm = vlstack.load(tmp_path / "base", device=DEVICE)
    vlm.load_adapter("p", tmp_path / "peft")
    x = inputs(vlm)
    with torch.no_grad():
        ref = peft_model.eval()(input_ids=x["input_ids"], pixel_values=x["pixel_values"]).logits
    assert rel_err(vlm(x["input_ids"], x["pixel_values"], adapter="p"), ref) <= 1e-4
    assert rel_err(vlm(x["input_ids"], x["pixel_values"]), ref) > 1e-2

    spec = LoRASpec(rank=4, alpha=8)
    added = add_adapter(vlm.model, "ours", spec, seed=1)
    randomise_adapter(added, seed=4)
    save_adapter(vlm.model, "ours", tmp_path / "ours", spec)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["target_modules"]
    assert {m.rsplit(".", 1)[-1] for m in saved} == set(FAMILY_SHAPES["phi3" if kind == "phi3" else "llama"][1])
    hf = InternVLForConditionalGeneration.from_pretrained(tmp_path / "base").to(DEVICE).eval()
    theirs = PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    with torch.no_grad():
        ref = theirs(input_ids=x["input_ids"], pixel_values=x["pixel_values"]).logits
    assert rel_err(vlm(x["input_ids"], x["pixel_values"], adapter="ours"), ref) <= 1e-4


def test_internlm2_adapters_use_its_own_names(internlm2, tmp_path):
    """On InternLM2, PEFT's names (wqkv, wo, w1-w3) and the generic ones name the same layers; an adapter is written
    under the original model's module names and reads back the same."""
    from test_lora import inputs, randomise_adapter

    from vlstack.adapters import save_adapter
    from vlstack.layers.lora import LoRASpec, add_adapter, remove_adapter

    _, vlm, _ = internlm2
    spec = LoRASpec(rank=4, alpha=8, targets=("wqkv", "w2"))
    randomise_adapter(add_adapter(vlm.model, "a", spec, seed=1), seed=5)
    try:
        save_adapter(vlm.model, "a", tmp_path / "a", spec)
        names = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"]
        assert sorted(names) == [
            f"language_model.model.layers.{i}.{m}" for i in range(2) for m in ("attention.wqkv", "feed_forward.w2")
        ]
        x = inputs(vlm)
        want = vlm(x["input_ids"], x["pixel_values"], adapter="a")
        vlm.load_adapter("b", tmp_path / "a")
        assert torch.equal(vlm(x["input_ids"], x["pixel_values"], adapter="b"), want)
        assert rel_err(vlm(x["input_ids"], x["pixel_values"]), want) > 1e-2
        vlm.unload_adapter("b")
        generic = LoRASpec(rank=4, alpha=8)
        assert (
            sorted(m.rsplit(".", 1)[-1] for m in generic.modules(vlm.model))[:4]
            == ["down_proj"] * 2 + ["gate_proj"] * 2
        )
        assert {m.rsplit(".", 1)[-1] for m in generic.modules(vlm.model)} == {
            "qkv_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        }
    finally:
        remove_adapter(vlm.model, "a")


@pytest.mark.parametrize("kind", ["phi3", "internlm2"])
def test_fused_training_on_fused_projections(kind, tmp_path, internlm2):
    """Two adapters trained fused on a family whose q/k/v (and Phi-3's gate/up) are one layer end as each trained
    alone, and lower their loss."""
    from test_train import assert_same_adapter, write_dataset

    from vlstack.train.jobs import Job
    from vlstack.train.multi import train

    if kind == "phi3":
        write_hf_checkpoint(tmp_path / "base", **FAMILY_SHAPES["phi3"][0])
        base = tmp_path / "base"
    else:
        base = internlm2[2] / "internlm2"
    data = tmp_path / "data"

    targets = ["wqkv", "w2"] if kind == "internlm2" else ["qkv_proj"]  # (PEFT's names for the family's layers)

    def jobs(out: str) -> list[Job]:
        return [
            Job.of(
                "a",
                write_dataset(data, "a", 4, True),
                tmp_path / out / "a",
                rank=4,
                alpha=8,
                batch_size=2,
                steps=6,
                lr=2e-2,
                seed=1,
            ),
            Job.of(
                "b",
                write_dataset(data, "b", 4, False, 1),
                tmp_path / out / "b",
                rank=2,
                alpha=4,
                batch_size=2,
                steps=6,
                lr=2e-2,
                seed=2,
                targets=targets,
            ),
        ]

    done = train(vlstack.load(base, device="cpu"), jobs("fused"), max_rows=4, verbose=False)
    assert all(r.losses[-1] < r.losses[0] for r in done.values())
    from safetensors.torch import load_file

    for job in jobs("alone"):
        train(vlstack.load(base, device="cpu"), [job], max_rows=4, verbose=False)
        fused = load_file(tmp_path / "fused" / job.name / "adapter_model.safetensors")
        assert_same_adapter(fused, load_file(job.output / "adapter_model.safetensors"))
