"""V2PE (InternVL3's variable visual position encoding): an image's tokens advance the RoPE position by delta < 1,
the text after it going on from the next whole position; in chat, serving (chunked prefill, decode, the static
step) and training alike. delta = 1 is the plain positions."""

from __future__ import annotations

import pytest
import torch
from conftest import image

import vlstack
from vlstack.chat import question_messages
from vlstack.errors import ConfigError
from vlstack.layers.step import packed_step, v2pe

IMG = 9  # the image token in the hand computations


def test_positions_equal_a_hand_computation():
    ids = torch.tensor([1, 2, 3, IMG, IMG, IMG, 4, 5, 3, IMG, IMG, 4, 6])  # two images: 3 tokens after <img>=3, then 2
    rope, offset = v2pe(ids, IMG, 0.5)
    # <img> at 2; its tokens at 2.5, 3, 3.5; </img> at ceil(3.5) + 1 = 5; text 6, <img> 7; 7.5, 8; </img> 9; 10
    assert rope.tolist() == [0, 1, 2, 2.5, 3, 3.5, 5, 6, 7, 7.5, 8, 9, 10]
    assert offset == 10 - 12  # a token after these: its position (13) - 2
    rope, offset = v2pe(ids, IMG, 0.25)  # 2.25, 2.5, 2.75 -> </img> at 4; <img> 6: 6.25, 6.5 -> </img> 8
    assert rope.tolist() == [0, 1, 2, 2.25, 2.5, 2.75, 4, 5, 6, 6.25, 6.5, 8, 9]
    assert offset == 9 - 12
    rope, offset = v2pe(ids, IMG, 1.0)
    assert torch.equal(rope, torch.arange(13, dtype=torch.float64)) and offset == 0
    assert v2pe(torch.tensor([1, IMG, IMG]), IMG, 0.5)[1] == 2 - 3  # ending in an image: the next text at ceil(1) + 1


@pytest.fixture(scope="module")
def tiny():
    return vlstack.load("tiny", device="cpu")


def prompt(vlm, question="What does the chart show?", size=(300, 120)):
    return vlm.processor(question_messages(question, 1), [image(*size)])


def test_delta_one_is_todays_logits(tiny):
    x = prompt(tiny)
    ids, pixels = x["input_ids"], x["pixel_values"]
    plain = tiny.model(ids[0], packed_step([ids.shape[1]], "cpu"), pixels)
    rope = v2pe(ids[0], tiny.cfg.image_token_id, 1.0)[0]  # the V2PE path, explicitly, with delta 1
    assert torch.equal(tiny.model(ids[0], packed_step([ids.shape[1]], "cpu", rope=rope), pixels), plain)
    one = vlstack.load("tiny", device="cpu", v2pe_delta=1.0)
    assert torch.equal(one(ids, pixels), tiny(ids, pixels))


def test_delta_changes_the_logits_as_its_positions_say(tiny):
    """With delta 0.25 the logits are those of RoPE at V2PE's positions; they differ from delta 1's."""
    quarter = vlstack.load("tiny", device="cpu", v2pe_delta=0.25)
    x = prompt(quarter)
    ids, pixels = x["input_ids"], x["pixel_values"]
    rope = v2pe(ids[0], quarter.cfg.image_token_id, 0.25)[0]
    want = tiny.model(ids[0], packed_step([ids.shape[1]], "cpu", rope=rope), pixels)
    got = quarter(ids, pixels)[0]
    assert torch.equal(got, want)
    assert (got - tiny(ids, pixels)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("static", [False, True])
def test_generation_follows_v2pe_through_chunks_and_decode(static):
    """Greedy tokens from the engine (prefill cut into chunks that end inside the image, decode rows, the static
    step) are the argmax of a whole-sequence forward at V2PE's positions, token after token."""
    from vlstack.sampling import SamplingParams

    vlm = vlstack.load("tiny", device="cpu", v2pe_delta=0.5)
    encoded = [prompt(vlm, size=(100, 100)), prompt(vlm, "Describe it.", size=(100, 100))]
    vlm.eos = set()
    engine = vlm.engine(2, max_len=1024, prefill_tokens=50, image_cache_mb=0, background=False, static=static)
    rows = [engine.submit(e, None, SamplingParams(max_new_tokens=6)) for e in encoded]
    while not all(r.finished_at for r in rows):
        engine.step()
    for e, r in zip(encoded, rows):
        ids = e["input_ids"][0]
        for token in r.detok.ids:
            logits = vlm(ids[None], e["pixel_values"])[0, -1]
            assert int(logits.argmax()) == token
            ids = torch.cat([ids, torch.tensor([token])])


def test_training_sees_v2pe_positions(tmp_path):
    """A training step's loss under V2PE is the cross-entropy of the V2PE logits."""
    import json

    from vlstack.train.jobs import read_plan
    from vlstack.train.multi import train

    image(300, 120).save(tmp_path / "chart.png")
    row = {
        "image": "chart.png",
        "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A chart."}],
    }
    (tmp_path / "data.jsonl").write_text(json.dumps(row) + "\n")
    job = dict(
        name="a", data=str(tmp_path / "data.jsonl"), output=str(tmp_path / "out"), steps=1, batch_size=1, lr=1e-4
    )
    (tmp_path / "jobs.yaml").write_text(json.dumps({"model": "tiny", "jobs": [job]}))
    vlm = vlstack.load("tiny", device="cpu", v2pe_delta=0.25)
    plan = read_plan(tmp_path / "jobs.yaml")
    loss = train(vlm, plan.jobs, plan.max_rows, verbose=False)["a"].losses[0]
    from vlstack.train.data import encode_example, read_dataset

    x = encode_example(vlm.processor, read_dataset(tmp_path / "data.jsonl")[0], 4096)
    logits = vlm(x["input_ids"][None], x["pixel_values"])[0, :-1]
    want = torch.nn.functional.cross_entropy(logits, x["labels"][1:], ignore_index=-100)
    assert abs(loss - float(want)) < 1e-5  # (at plain positions it is off by 7e-5)


def test_bad_delta_is_refused():
    with pytest.raises(ConfigError, match=r"V2PE delta must be in \(0, 1\]"):
        vlstack.load("tiny", device="cpu", v2pe_delta=2.0)
