"""Tiny InternVL checkpoints written by transformers itself, the oracle of the parity tests."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from vlstack.tiny import ASSETS

IMAGE_TOKEN_ID = 5  # <IMG_CONTEXT> in the tiny tokenizer
VOCAB = 1029

# where the parity tests run both models: `VLSTACK_TEST_DEVICE=cuda pytest tests/test_parity.py` repeats
# them on a GPU (CI has none: cpu). float32 on a GPU means true float32, not TF32.
DEVICE = os.environ.get("VLSTACK_TEST_DEVICE", "cpu")
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Tests build the tiny model in their own cache, never the user's."""
    os.environ["VLSTACK_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


def hf_config(
    tile: int = 56,
    vision_width: int = 32,
    vision_layers: int = 2,
    norm_type: str = "layer_norm",
    qk_norm: bool = False,
    vision_bias: bool = True,
    width: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    tied: bool = True,
    feature_layer: int = -1,
    rope_theta: float = 10000.0,
    text_act: str = "silu",
    vision_act: str = "gelu",
    projector_act: str = "gelu",
    text: dict | None = None,
):
    """A tiny InternVL config; text: text_config fields over the Qwen2 defaults (another family's model_type and
    its own fields)."""
    from transformers import InternVLConfig

    tokens = (tile // 14) ** 2 // 4
    return InternVLConfig(
        vision_config=dict(
            hidden_size=vision_width,
            num_hidden_layers=vision_layers,
            num_attention_heads=4,
            intermediate_size=vision_width * 2,
            image_size=tile,
            patch_size=14,
            norm_type=norm_type,
            use_qk_norm=qk_norm,
            attention_bias=vision_bias,
            hidden_act=vision_act,
        ),
        text_config={
            **dict(
                model_type="qwen2",
                hidden_size=width,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=kv_heads,
                intermediate_size=width * 2,
                vocab_size=VOCAB,
                tie_word_embeddings=tied,
                rope_theta=rope_theta,
                eos_token_id=2,
                max_position_embeddings=4096,
                hidden_act=text_act,
            ),
            **(text or {}),
        },
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=tokens,
        tie_word_embeddings=tied,
        vision_feature_layer=feature_layer,
        projector_hidden_act=projector_act,
    )


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere (transformers' init zeroes the class token, positions and biases)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if re.search(r"norm|layernorm", name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def copy_tokenizer(directory: Path) -> None:
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(ASSETS / f, directory / f)


def write_hf_checkpoint(directory: Path, seed: int = 0, **shape) -> torch.nn.Module:
    """A random InternVL written by transformers' save_pretrained; returns the transformers model."""
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration(hf_config(**shape)).eval()
    randomise(model, seed)
    model.save_pretrained(directory)
    copy_tokenizer(directory)
    return model


ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "phi3": "Phi3ForCausalLM",
}


def llm_config(t: dict) -> dict:
    """A transformers text_config as the original layout's llm_config (as the releases' config.json write it: the
    RoPE's base and scaling in the older fields)."""
    out = {k: v for k, v in t.items() if k not in ("rope_parameters", "architectures", "dtype")}
    rope = dict(t["rope_parameters"])
    out["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type", "default")
    out["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
    return {"architectures": [ARCHITECTURES[t["model_type"]]], **out}


INTERNLM2_NAMES = {
    "embed_tokens": "tok_embeddings",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}


def internlm2_llm(t: dict, state: dict, out: dict) -> dict:
    """A Llama text model as InternLM2 in the original layout: its llm_config, and its weights into out (q/k/v
    packed into wqkv per KV head: that head's query heads, its key, its value; the head as `output`)."""
    assert t["model_type"] == "llama" and not t["attention_bias"] and not t["mlp_bias"]
    kv, d = t["num_key_value_heads"], t["head_dim"]
    for key, tensor in state.items():
        if not key.startswith("language_model."):
            continue
        name = key.replace("language_model.lm_head.", "language_model.output.")
        for ours, theirs in INTERNLM2_NAMES.items():
            name = name.replace(f".{ours}.", f".{theirs}.")
        if ".self_attn.q_proj." in name:
            prefix = name.split(".self_attn.")[0]
            q, k, v = (state[key.replace("q_proj", x)] for x in ("q_proj", "k_proj", "v_proj"))
            groups = [q.view(kv, -1, d, q.shape[1]), k.view(kv, 1, d, k.shape[1]), v.view(kv, 1, d, v.shape[1])]
            out[prefix + ".attention.wqkv.weight"] = torch.cat(groups, dim=1).reshape(-1, q.shape[1])
        elif ".self_attn." not in name or ".o_proj." in key:
            out[name] = tensor
    config = {k: v for k, v in llm_config(t).items() if k not in ("attention_bias", "mlp_bias", "head_dim")}
    return {**config, "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False}


def to_original_layout(src: Path, dst: Path, internlm2: bool = False) -> None:
    """Rewrite a transformers checkpoint in the original OpenGVLab layout (config and key names),
    following transformers' conversion script in reverse (the original projector's activation is always GELU).
    internlm2: its Llama LLM as InternLM2 (internlm2_llm)."""
    dst.mkdir(parents=True)
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["projector_hidden_act"] == "gelu", "the original layout has a GELU projector"
    v, t = cfg["vision_config"], cfg["text_config"]
    original = {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "downsample_ratio": cfg["downsample_ratio"],
        "select_layer": cfg["vision_feature_layer"],
        "force_image_size": v["image_size"][0],
        "ps_version": "v2",
        "template": "internvl2_5",
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 12,
        "torch_dtype": "float32",
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": v["hidden_size"],
            "num_hidden_layers": v["num_hidden_layers"],
            "num_attention_heads": v["num_attention_heads"],
            "intermediate_size": v["intermediate_size"],
            "image_size": v["image_size"][0],
            "patch_size": v["patch_size"][0],
            "norm_type": v["norm_type"],
            "qk_normalization": v["use_qk_norm"],
            "qkv_bias": v["attention_bias"],
            "layer_norm_eps": v["layer_norm_eps"],
            "hidden_act": v["hidden_act"],
        },
        "llm_config": llm_config(t),
    }
    (dst / "config.json").write_text(json.dumps(original, indent=2))
    state = load_file(src / "model.safetensors")
    out, qkv = {}, {}
    for key, tensor in state.items():
        if key.startswith("vision_tower."):
            new = "vision_model." + key[len("vision_tower.") :]
            new = new.replace(".encoder.layer.", ".encoder.layers.")
            new = new.replace("embeddings.cls_token", "embeddings.class_embedding")
            new = new.replace("embeddings.position_embeddings", "embeddings.position_embedding")
            new = new.replace("embeddings.patch_embeddings.projection", "embeddings.patch_embedding")
            new = re.sub(r"\.lambda_(\d)$", r".ls\1", new)
            new = new.replace(".attention.projection_layer.", ".attn.proj.")
            new = new.replace(".attention.", ".attn.")
            new = new.replace(".layernorm_before.", ".norm1.").replace(".layernorm_after.", ".norm2.")
            m = re.match(r"(.*\.attn\.)([qkv])_proj\.(weight|bias)$", new)
            if m:
                qkv.setdefault(m.group(1) + "qkv." + m.group(3), {})[m.group(2)] = tensor
                continue
            out[new] = tensor
        elif key.startswith("multi_modal_projector."):
            rest = key[len("multi_modal_projector.") :]
            for ours, idx in (("layer_norm", "0"), ("linear_1", "1"), ("linear_2", "3")):
                rest = rest.replace(ours + ".", idx + ".")
            out["mlp1." + rest] = tensor
        elif not internlm2:
            out[key] = tensor
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if internlm2:
        original["llm_config"] = internlm2_llm(t, state, out)
        (dst / "config.json").write_text(json.dumps(original, indent=2))
    heads = {"language_model.lm_head.weight", "language_model.output.weight"}
    if t["tie_word_embeddings"] is False and not heads & set(out):
        raise AssertionError("untied checkpoint without lm_head")
    save_file(out, str(dst / "model.safetensors"))
    copy_tokenizer(dst)


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A noisy RGB image (noise makes every resize and tile distinguishable)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def hf_image_processor(tile: int, max_tiles: int = 12, min_tiles: int = 1):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    return GotOcr2ImageProcessorPil(
        size={"height": tile, "width": tile},
        crop_to_patches=True,
        min_patches=min_tiles,
        max_patches=max_tiles,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )


def greedy_ids(vlm, encoded: list[dict], n: int, adapters: list | None = None, engine=None) -> list[list[int]]:
    """Each encoded prompt's first n greedy tokens from the engine (a new one, or this one), batched, each with its
    adapter; EOS does not end a row (as with transformers' min_new_tokens)."""
    from vlstack.sampling import SamplingParams

    eos, vlm.eos = vlm.eos, set()
    try:
        longest = max(e["input_ids"].shape[1] for e in encoded)
        engine = engine or vlm.engine(len(encoded), max_len=longest + n, image_cache_mb=0, background=False)
        adapters = adapters or [None] * len(encoded)
        rows = [engine.submit(e, a, SamplingParams(max_new_tokens=n)) for e, a in zip(encoded, adapters)]
        while not all(r.finished_at for r in rows):
            engine.step()
        assert all(r.finish_reason == "length" for r in rows), [r.error for r in rows]
        return [r.detok.ids for r in rows]
    finally:
        vlm.eos = eos


def rows_forward(model, ids: torch.Tensor, pixel_values=None, adapters=None) -> torch.Tensor:
    """ids [B, T] (+ their images' tiles in order) -> logits [B, T, V], row i with adapters[i]: the rows packed
    into one step as every caller does (with autograd when it is on)."""
    from vlstack.layers.lora import route
    from vlstack.layers.step import packed_step

    b, t = ids.shape
    step = packed_step([t] * b, ids.device)
    step.lora = route(model, adapters or [None] * b, counts=[t] * b)  # (several adapters: by slot, as the engine)
    return model(ids.flatten(), step, pixel_values).view(b, t, -1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def run_cli(*args: str, processes: int = 1, timeout: int = 300, cwd=None) -> subprocess.CompletedProcess:
    """`vlstack ARGS` as a user runs it, in a subprocess; with processes > 1, under torchrun."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [*launcher, "-m", "vlstack.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def started(jobs: list) -> tuple:
    """The tiny model ready to train (frozen, in training mode) and each job started on it: (vlm, running)."""
    import vlstack
    from vlstack.train.data import read_dataset
    from vlstack.train.running import start

    vlm = vlstack.load("tiny", device="cpu")
    for p in vlm.model.parameters():
        p.requires_grad_(False)
    vlm.model.train()
    return vlm, [start(vlm, j, read_dataset(j.data)) for j in jobs]
