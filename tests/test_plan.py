"""`vlstack plan` against figures computed here by hand for InternVL3-1B, 8B and 78B (their configs written by
the test: no downloads)."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from vlstack.errors import ConfigError
from vlstack.models.config_json import parse_config
from vlstack.plan import parse_gpus, plan

VIT_300M = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    norm_type="layer_norm",
    use_qk_norm=False,
    attention_bias=True,
)
VIT_6B = dict(
    hidden_size=3200,
    num_hidden_layers=45,
    num_attention_heads=25,
    intermediate_size=12800,
    norm_type="rms_norm",
    use_qk_norm=True,
    attention_bias=False,
)
MODELS = {  # (vision, Qwen2.5 LLM: hidden, layers, heads, KV heads, intermediate, tied)
    "InternVL3-1B": (VIT_300M, (896, 24, 14, 2, 4864, True)),
    "InternVL3-8B": (VIT_300M, (3584, 28, 28, 4, 18944, False)),
    "InternVL3-78B": (VIT_6B, (8192, 80, 64, 8, 29568, False)),
}
VOCAB = 151674


def config(name: str) -> dict:
    vision, (hidden, layers, heads, kv, inter, tied) = MODELS[name]
    return {
        "model_type": "internvl",
        "vision_config": {**vision, "image_size": [448, 448], "patch_size": [14, 14], "use_mean_pooling": True},
        "text_config": {
            "model_type": "qwen2",
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "intermediate_size": inter,
            "vocab_size": VOCAB,
            "tie_word_embeddings": tied,
            "rope_theta": 1e6,
        },
        "downsample_ratio": 0.5,
    }


def by_hand(name: str) -> dict:
    v, (c, layers, heads, kv, inter, tied) = MODELS[name]
    cv, iv, lv = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    norm = cv if v["norm_type"] == "rms_norm" else 2 * cv
    vit_layer = (
        4 * cv * cv
        + cv
        + (3 * cv if v["attention_bias"] else 0)
        + (2 * cv if v["use_qk_norm"] else 0)
        + 2 * norm
        + 2 * cv
        + cv * iv
        + iv
        + iv * cv
        + cv
    )
    vision = 3 * 14 * 14 * cv + cv + cv + (32 * 32 + 1) * cv + lv * vit_layer
    projector = 2 * 4 * cv + 4 * cv * c + c + c * c + c
    d = c // heads
    q, k = heads * d, kv * d
    layer = c * (q + 2 * k) + (q + 2 * k) + q * c + 3 * c * inter + 2 * c  # Qwen2: q/k/v bias, two RMSNorms
    embeddings = VOCAB * c * (1 if tied else 2) + c  # (+ the final norm)
    return {
        "vision": vision + projector,
        "layers": layers * layer,
        "embeddings": embeddings,
        "kv": 2 * layers * kv * d * 2,
        "linear": layers * (c * (q + 2 * k) + q * c + 3 * c * inter),
    }


@pytest.mark.parametrize("name", list(MODELS))
def test_figures_equal_a_hand_computation(name):
    cfg, want = parse_config(config(name)), by_hand(name)
    p = plan(cfg, "1xH100-80GB", None, 8192, 1, 4096)
    n = p["parameters"]
    assert (n["vision+projector"], n["decoder layers"], n["embeddings"]) == (
        want["vision"],
        want["layers"],
        want["embeddings"],
    )
    assert p["kv_bytes_per_token"] == want["kv"] and p["kv_bytes"] == want["kv"] * 8192
    assert p["weight_bytes"]["total"] == 2 * (want["vision"] + want["layers"] + want["embeddings"])
    q = plan(cfg, "1xH100-80GB", "int4", 8192, 1, 4096)["weight_bytes"]["layers"]
    assert q == want["linear"] // 2 + (want["linear"] // 128) * 4 + 2 * (want["layers"] - want["linear"])


def test_the_tp_that_serves_internvl3_78b():
    """78B in bf16 (~157 GB): not on one or two 80 GB GPUs; four at one request of 8k tokens; eight for 64 such
    requests (their KV cache is 160 GiB). In int4 it fits on one."""
    cfg, want = parse_config(config("InternVL3-78B")), by_hand("InternVL3-78B")
    usable = 80e9 * 0.9
    one = plan(cfg, "8xA100-80GB", None, 8192, 1, 4096)
    weights = 2 * (want["vision"] + want["layers"] + want["embeddings"])
    assert 150e9 < weights < 160e9
    for tp, need in one["per_gpu_bytes"].items():  # vision replicated, the LLM and KV heads split
        kv_split = min(tp, 8)  # (8 KV heads: replicated beyond 8 GPUs)
        llm = 2 * (want["layers"] + want["embeddings"])
        assert need == 2 * want["vision"] + llm / tp + want["kv"] * 8192 / kv_split
    assert [tp for tp, need in one["per_gpu_bytes"].items() if need <= usable][0] == one["smallest_tp"] == 4
    many = plan(cfg, "8xA100-80GB", None, 8192, 64, 4096)
    assert many["smallest_tp"] == 8 and many["fits_on_these"]
    assert plan(cfg, "2xA100-80GB", None, 8192, 64, 4096)["fits_on_these"] is False
    assert plan(cfg, "1xH100-80GB", "int4", 8192, 1, 4096)["smallest_tp"] == 1


@pytest.mark.slow
def test_gpus_and_the_command_line(tmp_path):
    assert parse_gpus("2xA100-80GB") == (2, 80, "A100-80GB") and parse_gpus("8x24GB") == (8, 24, "24GB")
    with pytest.raises(ConfigError, match="unknown GPU 'TPUv5'"):
        parse_gpus("4xTPUv5")
    (tmp_path / "config.json").write_text(json.dumps(config("InternVL3-78B")))
    out = run_cli("plan", "--model", str(tmp_path), "--gpus", "2xA100-80GB", "--context", "8192", "--concurrency", "1")
    assert out.returncode == 0, out.stderr
    assert "needs TP 4 (more than the 2 x A100-80GB)" in out.stdout and "320 KiB a token" in out.stdout
