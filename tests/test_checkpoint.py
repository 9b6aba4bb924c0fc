"""Checkpoint directories: sharded and single-file, atomic writes, and every kind of bad directory
refused with a message naming the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import write_hf_checkpoint

import vlstack
from vlstack.checkpoint import INDEX, save_checkpoint
from vlstack.errors import ConfigError
from vlstack.models.config_json import parse_config, to_native


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    write_hf_checkpoint(d, tile=56)
    return d


def test_sharded_checkpoint_loads_like_single(ckpt, tmp_path):
    vlm = vlstack.load(ckpt, device="cpu")
    state = vlm.model.state_dict()
    state.pop("lm_head.weight")
    save_checkpoint(
        tmp_path / "sharded",
        state,
        to_native(vlm.cfg),
        {"tokenizer.json": ckpt / "tokenizer.json"},
        max_shard_bytes=20_000,
    )
    index = json.loads((tmp_path / "sharded" / INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 3
    again = vlstack.load(tmp_path / "sharded", device="cpu")
    ids = torch.tensor([[1, 2, 3, 4, 7, 9]])
    assert torch.equal(again(ids), vlm(ids))


def test_sharded_checkpoint_loads_in_transformers(ckpt, tmp_path):
    from transformers import InternVLForConditionalGeneration

    vlm = vlstack.load(ckpt, device="cpu")
    state = vlm.model.state_dict()
    state.pop("lm_head.weight")
    save_checkpoint(tmp_path / "s", state, to_native(vlm.cfg), max_shard_bytes=50_000)
    hf = InternVLForConditionalGeneration.from_pretrained(tmp_path / "s").eval()
    ids = torch.tensor([[1, 2, 3, 4, 7, 9]])
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, vlm(ids))


def test_failed_write_leaves_no_partial_directory(tmp_path):
    class Boom(dict):
        def items(self):
            yield "a.weight", torch.zeros(2)
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path / "out", Boom(), {})
    assert list(tmp_path.iterdir()) == []


def test_not_a_directory():
    with pytest.raises(ConfigError, match="loads local checkpoints only"):
        vlstack.load("/no/such/model")


def test_missing_pieces_are_named(ckpt, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(ckpt, d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="has neither tokenizer.json nor a SentencePiece tokenizer.model"):
        vlstack.load(d)
    shutil.copyfile(ckpt / "tokenizer.json", d / "tokenizer.json")
    (d / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="holds neither model.safetensors nor"):
        vlstack.load(d)
    (d / "config.json").unlink()
    with pytest.raises(ConfigError, match="has no config.json"):
        vlstack.load(d)


def test_malformed_config_and_tokenizer(ckpt, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(ckpt, d)
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="could not be read as a tokenizer"):
        vlstack.load(d)
    (d / "config.json").write_text("{broken")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        vlstack.load(d)


def test_weights_that_disagree_with_config(ckpt, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(ckpt, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"missing weights: language_model\.layers\.2\."):
        vlstack.load(d)
    cfg["text_config"]["num_hidden_layers"] = 2
    cfg["text_config"]["intermediate_size"] = 100
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ConfigError, match=r"mlp\.\w+_proj\.weight has shape \(\d+, \d+\), the config implies \(.*100.*\)"
    ):
        vlstack.load(d)


def _native(**text):
    base = json.loads((vlstack.tiny.ASSETS / "config.json").read_text())
    base["text_config"].update(text)
    return base


def test_unsupported_architectures_get_one_clear_error():
    with pytest.raises(ConfigError, match=r"language model 'qwen3_moe' is not supported.*qwen2.*internlm2"):
        parse_config(_native(model_type="qwen3_moe"))
    original = {
        "model_type": "internvl_chat",
        "vision_config": _native()["vision_config"],
        "llm_config": {"architectures": ["GptOssForCausalLM"]},
    }
    with pytest.raises(ConfigError, match="'GptOssForCausalLM' is not supported"):
        parse_config(original)
    with pytest.raises(ConfigError, match="model_type 'llava' is not an InternVL checkpoint"):
        parse_config({"model_type": "llava"})
    with pytest.raises(ConfigError, match="rope type 'yarn' is not supported"):
        parse_config(_native(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6}))
    with pytest.raises(ConfigError, match=r"text_config.hidden_act 'xielu' is not supported; choose one of"):
        parse_config(_native(hidden_act="xielu"))
    with pytest.raises(ConfigError, match="projector_hidden_act 'tanh' is not supported"):
        parse_config({**_native(), "projector_hidden_act": "tanh"})
    with pytest.raises(ConfigError, match="missing the field 'hidden_size'"):
        parse_config({"model_type": "internvl", "vision_config": {}, "text_config": {}})


def test_config_field_spellings_across_versions():
    """rope_theta at the top (transformers 4.x) or in rope_parameters (5.x); torch_dtype or dtype."""
    old = _native(rope_theta=5e5)
    del old["text_config"]["rope_parameters"]
    old["torch_dtype"] = old.pop("dtype")
    new = _native(rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    a, b = parse_config(old), parse_config(new)
    assert a.text.rope_theta == b.text.rope_theta == 5e5
    assert a.dtype == b.dtype == "float32"


def test_original_config_fields():
    raw = {
        "model_type": "internvl_chat",
        "force_image_size": 448,
        "select_layer": -1,
        "ps_version": "v2",
        "downsample_ratio": 0.5,
        "max_dynamic_patch": 6,
        "min_dynamic_patch": 1,
        "use_thumbnail": True,
        "vision_config": {
            "hidden_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "image_size": 224,
            "patch_size": 14,
            "qkv_bias": True,
            "qk_normalization": True,
            "norm_type": "rms_norm",
        },
        "llm_config": {
            "model_type": "qwen2",
            "hidden_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
            "vocab_size": 100,
            "rope_theta": 1e6,
        },
    }
    cfg = parse_config(raw)
    assert cfg.vision.image_size == 448 and cfg.tokens_per_tile == 256
    assert cfg.vision.use_qk_norm and cfg.vision.attention_bias and cfg.max_tiles == 6
