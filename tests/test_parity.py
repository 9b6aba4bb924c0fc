"""vlstack computes what transformers' InternVL computes: same checkpoint, same inputs -> same logits
(float32, relative error <= 1e-4) and the same greedy tokens. Both models run on DEVICE (conftest:
`VLSTACK_TEST_DEVICE=cuda` repeats these on a GPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, greedy_ids, image, rel_err, to_original_layout, write_hf_checkpoint

import vlstack

SHAPES = {
    "gqa2-tied-layernorm-56": dict(tile=56, heads=4, kv_heads=2, tied=True),
    "gqa4-untied-rmsnorm-qknorm-84": dict(
        tile=84, heads=8, kv_heads=2, tied=False, norm_type="rms_norm", qk_norm=True, vision_bias=False
    ),
    "mha-feature-layer-2-112": dict(tile=112, heads=4, kv_heads=4, feature_layer=-2, vision_layers=3, width=96),
    "mqa-rope-1e6-56": dict(tile=56, heads=4, kv_heads=1, rope_theta=1e6, layers=3),
    "other-activations-56": dict(tile=56, text_act="gelu_pytorch_tanh", vision_act="quick_gelu"),
    # the other LLM families (InternVL2-40B/76B, InternVL2-4B, InternVL3.5), each with what sets it apart
    "llama-bias-llama3rope-56": dict(
        tile=56,
        tied=False,
        text=dict(
            model_type="llama",
            attention_bias=True,
            mlp_bias=True,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=5e5,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    # LongRoPE switching to its long factors past 30 tokens: the text-only prompt (23 tokens) crosses 30 while
    # decoding, the others (78-88) start past it
    "phi3-longrope-56": dict(
        tile=56,
        text=dict(
            model_type="phi3",
            pad_token_id=0,
            original_max_position_embeddings=30,
            rope_parameters=dict(
                rope_type="longrope",
                rope_theta=1e4,
                short_factor=[1.0 + 0.1 * i for i in range(8)],
                long_factor=[2.0 + i for i in range(8)],
            ),
        ),
    ),
    "qwen3-headdim-56": dict(tile=56, kv_heads=1, text=dict(model_type="qwen3", head_dim=24)),
}

# (images as (width, height), question); several prompts per shape cover text-only, 1, many and 2 images
PROMPTS = [
    ([], "Describe the chart in one word."),
    ([(50, 40)], "What is shown in the image?"),
    ([(300, 100)], "What does the chart show?"),  # wide: several tiles + thumbnail
    ([(120, 250), (60, 60)], "Compare the two images."),
]


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf = write_hf_checkpoint(directory, **SHAPES[request.param]).to(DEVICE)
    return hf, vlstack.load(directory, device=DEVICE, dtype="float32"), directory


def encode(vlm, images, question):
    """-> the processor's inputs, on DEVICE, and the images."""
    from vlstack.chat import question_messages

    imgs = [image(w, h, seed=i) for i, (w, h) in enumerate(images)]
    inputs = vlm.processor(question_messages(question, len(imgs)), imgs)
    return {k: v.to(DEVICE) for k, v in inputs.items()}, imgs


@pytest.mark.parametrize("prompt", range(len(PROMPTS)))
def test_logits_match_transformers(pair, prompt):
    hf, vlm, _ = pair
    inputs, _ = encode(vlm, *PROMPTS[prompt])
    ours = vlm(inputs["input_ids"], inputs.get("pixel_values"))
    with torch.no_grad():
        ref = hf(input_ids=inputs["input_ids"], pixel_values=inputs.get("pixel_values")).logits
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) <= 1e-4


def test_greedy_tokens_match_transformers(pair):
    hf, vlm, _ = pair
    for images, question in PROMPTS:
        inputs, _ = encode(vlm, images, question)
        with torch.no_grad():
            extra = {"pixel_values": inputs["pixel_values"]} if "pixel_values" in inputs else {}
            ref = hf.generate(
                input_ids=inputs["input_ids"], max_new_tokens=12, do_sample=False, min_new_tokens=12, **extra
            )[0, inputs["input_ids"].shape[1] :].tolist()
        assert greedy_ids(vlm, [inputs], 12) == [ref]


@pytest.mark.parametrize("rows", ["one", "all"])  # one row: no mask; rows of different lengths: masked
def test_decode_step_logits_match_transformers(pair, rows):
    """Each decode step (one new token a row, each row at its own length) gives the logits transformers gives
    at that position of the whole sequence."""
    from vlstack.engine.runner import Decoder, prefill
    from vlstack.layers.kv_cache import KVCache

    hf, vlm, _ = pair
    encoded = [encode(vlm, images, question)[0] for images, question in PROMPTS[: 1 if rows == "one" else None]]
    steps, b = 3, len(encoded)
    tiles = [e["pixel_values"] for e in encoded if "pixel_values" in e]
    cache = KVCache(vlm.cfg.text.kv_shape(b, 1024), torch.float32, DEVICE)
    decode = Decoder(vlm.model, cache)
    with torch.inference_mode():
        refs = [hf(**{k: v for k, v in e.items() if k != "labels"}).logits[0, -steps - 1 : -1] for e in encoded]
        logits = prefill(
            vlm.model,
            cache,
            [e["input_ids"][0, :-steps] for e in encoded],
            list(range(b)),
            [None] * b,
            torch.cat(tiles) if tiles else None,
        )
        for s in range(steps):
            for i in range(b):
                assert rel_err(logits[i], refs[i][s]) <= 1e-4
            tokens = torch.stack([e["input_ids"][0, s - steps] for e in encoded])  # each row's next prompt token
            positions = [e["input_ids"].shape[1] - steps + s for e in encoded]
            logits = decode(tokens.tolist(), positions, list(range(b)), [None] * b)  # [B, V]


def test_batched_generation_matches_one_at_a_time(pair):
    """Batches (prompts of different lengths, images in some rows) give each row the
    tokens it gets alone."""
    _, vlm, _ = pair
    encoded = [encode(vlm, images, question)[0] for images, question in PROMPTS]
    assert len({e["input_ids"].shape[1] for e in encoded}) == len(encoded)  # padding is exercised
    assert greedy_ids(vlm, encoded, 10) == [greedy_ids(vlm, [e], 10)[0] for e in encoded]


def test_the_projectors_activation_comes_from_the_config(tmp_path):
    hf = write_hf_checkpoint(tmp_path, tile=56, projector_act="relu").to(DEVICE)
    vlm = vlstack.load(tmp_path, device=DEVICE, dtype="float32")
    assert vlm.cfg.projector_hidden_act == "relu"
    inputs, _ = encode(vlm, *PROMPTS[2])
    with torch.no_grad():
        ref = hf(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
    assert rel_err(vlm(inputs["input_ids"], inputs["pixel_values"]), ref) <= 1e-4


def test_original_layout_gives_same_logits(pair, tmp_path):
    _, vlm, directory = pair
    to_original_layout(directory, tmp_path / "orig")
    orig = vlstack.load(tmp_path / "orig", device=DEVICE, dtype="float32")
    for images, question in PROMPTS[1:]:
        inputs, _ = encode(vlm, images, question)
        assert torch.equal(
            orig(inputs["input_ids"], inputs.get("pixel_values")),
            vlm(inputs["input_ids"], inputs.get("pixel_values")),
        )


def assert_saved_loads_in_transformers(hf, vlm, directory) -> dict:
    """vlm.save(directory) is a checkpoint transformers loads with hf's logits; -> the inputs it tried."""
    from transformers import InternVLForConditionalGeneration

    vlm.save(directory)
    back = InternVLForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).to(DEVICE).eval()
    inputs, _ = encode(vlm, *PROMPTS[2])
    with torch.no_grad():
        a = back(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
        b = hf(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
    assert torch.equal(a, b)
    return inputs


def test_saved_checkpoint_loads_in_transformers(pair, tmp_path):
    """What vlstack writes is a transformers-native checkpoint with the same weights."""
    hf, vlm, _ = pair
    inputs = assert_saved_loads_in_transformers(hf, vlm, tmp_path / "saved")
    again = vlstack.load(tmp_path / "saved", device=DEVICE, dtype="float32")
    assert torch.equal(
        again(inputs["input_ids"], inputs["pixel_values"]), vlm(inputs["input_ids"], inputs["pixel_values"])
    )


def test_bfloat16_matches_transformers_bfloat16(pair):
    """In bfloat16 vlstack computes what transformers computes in bfloat16: on CPU the same kernels run in
    the same order (the logits agree to well under one bfloat16 step, in fact bit for bit, and so do the
    greedy tokens); on a GPU either may pick other fused kernels, so there the bound is a bfloat16 one.
    Both stay near the float32 logits."""
    from transformers import InternVLForConditionalGeneration

    _, vlm, directory = pair
    low = vlstack.load(directory, device=DEVICE, dtype="bfloat16")
    ref = InternVLForConditionalGeneration.from_pretrained(directory, dtype=torch.bfloat16).to(DEVICE).eval()
    bound = 1e-3 if DEVICE == "cpu" else 2e-2
    for images, question in PROMPTS:
        inputs, _ = encode(vlm, images, question)
        ids, pixels = inputs["input_ids"], inputs.get("pixel_values")
        ours = low(ids, pixels)
        with torch.no_grad():
            theirs = ref(input_ids=ids, pixel_values=pixels).logits
        full = vlm(ids, pixels)
        assert ours.dtype == theirs.dtype == torch.bfloat16
        assert rel_err(ours, theirs) < bound
        assert rel_err(ours, full) < 0.05 and rel_err(theirs, full) < 0.05
        if DEVICE == "cpu":
            with torch.no_grad():
                extra = {"pixel_values": pixels} if pixels is not None else {}
                want = ref.generate(input_ids=ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, **extra)
            assert greedy_ids(low, [inputs], 8) == [want[0, ids.shape[1] :].tolist()]
