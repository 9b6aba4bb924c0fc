"""Structured pruning (compress/prune.py): importance against a hand computation, pruning to 100% keeps the
logits, a pruned checkpoint loads in transformers with vlstack's logits, and targets the model cannot meet are
named before any work."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import image, rel_err, write_hf_checkpoint
from test_train import write_dataset

import vlstack
from vlstack.chat import question_messages
from vlstack.compress import compress, read_stages
from vlstack.compress.prune import PruneConfig, calibration, importance, prune
from vlstack.errors import ConfigError
from vlstack.layers.step import packed_step

SHAPE = dict(tile=56, width=64, layers=4, heads=4, kv_heads=2, tied=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    hf = write_hf_checkpoint(root / "base", **SHAPE)
    data = write_dataset(root / "data", "calib", 6, True)
    return hf, root / "base", data


def inputs(vlm):
    return vlm.processor(question_messages("What does the chart show?", 1), [image(120, 60)])


def test_importance_equals_a_hand_computation(setup):
    _, base, data = setup
    vlm = vlstack.load(base, device="cpu")
    cfg = PruneConfig(data=str(data), samples=3)
    examples = calibration(vlm, cfg)
    scores = importance(vlm, examples)
    # by hand: each layer's input from the layer before, its MLP's and attention's outputs written out
    lm, t = vlm.model.language_model, vlm.cfg.text
    mlp = torch.zeros(t.num_hidden_layers, t.intermediate_size)
    groups = torch.zeros(t.num_hidden_layers, t.num_key_value_heads)
    change = torch.zeros(t.num_hidden_layers)
    hidden = torch.zeros(t.hidden_size)
    with torch.no_grad():
        for x in examples:
            ids, step = x["input_ids"], packed_step([len(x["input_ids"])], "cpu")
            h = vlm.model.embed(ids, x.get("pixel_values"))
            cos, sin = lm.rotary(step, h.dtype)
            for i, layer in enumerate(lm.layers):
                a = layer.input_layernorm(h)
                hidden += a.abs().mean(0)
                attn = layer.self_attn
                q, k, v = attn.qkv(a)
                from vlstack.layers.attention import attention
                from vlstack.layers.rotary import rotate

                o = attention(rotate(q, cos, sin), rotate(k, cos, sin), v, step, None, i)  # [T, H, D]
                groups[i] += o.norm(dim=-1).mean(0).view(t.num_key_value_heads, -1).sum(-1)
                mid = h + attn.o_proj(o.reshape(len(ids), -1))
                b = layer.post_attention_layernorm(mid)
                hidden += b.abs().mean(0)
                act = F.silu(layer.mlp.gate_proj(b)) * layer.mlp.up_proj(b)
                mlp[i] += act.abs().mean(0)
                out = mid + layer.mlp.down_proj(act)
                change[i] += 1 - F.cosine_similarity(h, out, dim=-1).mean()
                h = out
            hidden += lm.norm(h).abs().mean(0)
    n = len(examples)
    for name, want in (("mlp", mlp), ("groups", groups), ("layers", change), ("hidden", hidden)):
        torch.testing.assert_close(scores[name], want / n, rtol=1e-5, atol=1e-6, msg=name)


def assert_pruning_to_everything_keeps_the_logits(base, data) -> None:
    vlm = vlstack.load(base, device="cpu")
    x = inputs(vlm)
    before = vlm(x["input_ids"], x["pixel_values"])
    cfg = PruneConfig(data=str(data), samples=2)
    prune(vlm, cfg, importance(vlm, calibration(vlm, cfg)))
    assert torch.equal(vlm(x["input_ids"], x["pixel_values"]), before)


def test_pruning_to_everything_keeps_the_logits(setup):
    _, base, data = setup
    assert_pruning_to_everything_keeps_the_logits(base, data)


def test_a_pruned_checkpoint_loads_in_transformers(setup, tmp_path):
    from transformers import InternVLForConditionalGeneration

    _, base, data = setup
    (tmp_path / "p.yaml").write_text(
        json.dumps(
            {
                "stages": [
                    {"prune": {"mlp": 0.5, "heads": 0.5, "hidden": 0.75, "layers": 3, "data": str(data), "samples": 4}}
                ]
            }
        )
    )
    vlm = vlstack.load(base, device="cpu")
    out = compress(vlm, read_stages(tmp_path / "p.yaml"), tmp_path / "out")
    text = json.loads((out / "config.json").read_text())["text_config"]
    assert (
        text["num_hidden_layers"],
        text["intermediate_size"],
        text["num_key_value_heads"],
        text["num_attention_heads"],
        text["hidden_size"],
    ) == (3, 64, 1, 2, 48)
    x = inputs(vlm)
    ours = vlstack.load(out, device="cpu")(x["input_ids"], x["pixel_values"])
    assert torch.equal(ours, vlm(x["input_ids"], x["pixel_values"]))
    hf = InternVLForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=x["input_ids"], pixel_values=x["pixel_values"]).logits
    assert rel_err(ours, ref) <= 1e-4
    assert sum(p.numel() for p in hf.parameters()) < sum(
        p.numel() for p in InternVLForConditionalGeneration.from_pretrained(base).parameters()
    )


def test_targets_the_model_cannot_meet_are_named_before_any_work(setup, tmp_path):
    _, base, data = setup
    vlm = vlstack.load(base, device="cpu")
    cases = [
        ({"mlp": 0.001}, "pruning the MLP to 0.001 of 128 leaves nothing"),
        ({"layers": 9}, "prune layers 9: the model has 4"),
        ({"heads": 0.1}, "the KV heads to 0.1 of 2 leaves nothing"),
    ]
    for options, message in cases:
        (tmp_path / "p.yaml").write_text(json.dumps({"stages": [{"prune": {**options, "data": str(data)}}]}))
        with pytest.raises(ConfigError, match=message):
            compress(vlm, read_stages(tmp_path / "p.yaml"), tmp_path / "out")
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    (tmp_path / "p.yaml").write_text(json.dumps({"stages": [{"prune": {"mlp": 1.5}}]}))
    with pytest.raises(ConfigError, match=r"prune mlp must be a fraction in \(0, 1\]"):
        read_stages(tmp_path / "p.yaml")
    (tmp_path / "p.yaml").write_text(json.dumps({"stages": [{"quantize": {}}, {"prune": {}}]}))
    with pytest.raises(ConfigError, match="stages run in the order prune -> distill -> quantize"):
        read_stages(tmp_path / "p.yaml")


@pytest.mark.parametrize("kind", ["phi3", "internlm2"])
def test_fused_projections_prune_and_load_in_transformers(kind, tmp_path):
    """Phi-3's [Q; K; V] and [gate; up], InternLM2's per-group wqkv: pruning to everything keeps the logits; a
    pruned model (InternLM2 saved as Llama) loads in transformers with vlstack's logits."""
    from conftest import to_original_layout
    from test_families import FAMILY_SHAPES, LLAMA
    from transformers import InternVLForConditionalGeneration

    data = write_dataset(tmp_path / "data", "calib", 3, True)
    if kind == "phi3":
        write_hf_checkpoint(tmp_path / "base", **FAMILY_SHAPES["phi3"][0])
        base = tmp_path / "base"
    else:
        write_hf_checkpoint(tmp_path / "llama", **LLAMA)
        to_original_layout(tmp_path / "llama", tmp_path / "base", internlm2=True)
        base = tmp_path / "base"
    assert_pruning_to_everything_keeps_the_logits(base, data)
    stages = {"stages": [{"prune": {"mlp": 0.5, "heads": 0.5, "hidden": 0.75, "data": str(data), "samples": 2}}]}
    (tmp_path / "p.yaml").write_text(json.dumps(stages))
    vlm = vlstack.load(base, device="cpu")
    x = inputs(vlm)
    out = compress(vlm, read_stages(tmp_path / "p.yaml"), tmp_path / "out")
    assert vlm.cfg.text.num_key_value_heads == 1 and vlm.cfg.text.hidden_size == 48
    ours = vlm(x["input_ids"], x["pixel_values"])
    hf = InternVLForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=x["input_ids"], pixel_values=x["pixel_values"]).logits
    assert rel_err(ours, ref) <= 1e-4
