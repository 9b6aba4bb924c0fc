"""Chat template, placeholder expansion, generation options, and the public API on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import image

import vlstack
from vlstack.chat import IMAGE, question_messages
from vlstack.errors import PromptError


@pytest.fixture(scope="module")
def tiny():
    return vlstack.load("tiny", device="cpu")


def test_tiny_model_is_small_and_has_internvl_tokens(tiny):
    n = sum(p.numel() for p in tiny.model.parameters())
    assert 1_000_000 < n < 10_000_000
    for token in ("<img>", "</img>", "<IMG_CONTEXT>", "<|im_start|>", "<|im_end|>"):
        assert tiny.processor.token_id(token) is not None
    assert tiny.processor.img_context == tiny.cfg.image_token_id
    assert tiny.processor.tokenizer.get_vocab_size() == tiny.cfg.text.vocab_size


def test_tiny_model_is_deterministic(tmp_path, monkeypatch):
    """Built twice in two caches from the seed: the same weights."""
    from safetensors.torch import load_file

    from vlstack.tiny import tiny_dir

    first = load_file(tiny_dir() / "model.safetensors")
    monkeypatch.setenv("VLSTACK_CACHE", str(tmp_path))
    second = load_file(tiny_dir() / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_tiny_vision_positions_are_a_2d_sincos_table(tiny):
    """The vision tower's position embeddings: the class token's 0, then each patch's row in the first half of
    the channels and its column in the second (the same row: the same first half; the same column: the second)."""
    from vlstack.tiny import sincos_2d

    pos = tiny.model.vision_tower.embeddings.position_embeddings[0]  # [1 + 16*16, 128]
    assert torch.equal(pos[0], torch.zeros(128)) and torch.equal(pos[1:], sincos_2d(16, 128))
    grid = pos[1:].view(16, 16, 128)
    assert torch.equal(grid[3, 0, :64], grid[3, 15, :64]) and torch.equal(grid[0, 5, 64:], grid[9, 5, 64:])
    assert not torch.equal(grid[3, 0, 64:], grid[3, 1, 64:]) and not torch.equal(grid[2, 0, :64], grid[3, 0, :64])
    torch.testing.assert_close(grid[0, 0], torch.tensor([0.0, 1.0]).repeat_interleave(32).repeat(2))  # sin 0, cos 0


def test_template_and_placeholder_expansion(tiny):
    messages = question_messages("What is it?", 2, history=[("Hi", "Hello")], system="Be brief.")
    text, _ = tiny.processor.render(messages)
    assert tiny.processor.unmark(text) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello"
        "<|im_end|>\n<|im_start|>user\nImage-1: <image>\nImage-2: <image>\nWhat is it?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    imgs = [image(500, 200), image(50, 50)]
    ids = tiny.processor.encode(text, imgs)["input_ids"][0].tolist()
    p = tiny.processor
    starts = [i for i, t in enumerate(ids) if t == p.img_start]
    ends = [i for i, t in enumerate(ids) if t == p.img_end]
    tiles = [11, 1]  # 500x200 at tile 224 -> a 5x2 grid (aspect 2.5) + thumbnail; 50x50 -> one tile
    assert len(starts) == len(ends) == 2
    for s, e, n in zip(starts, ends, tiles):
        assert ids[s + 1 : e] == [p.img_context] * (n * tiny.cfg.tokens_per_tile)
    decoded = p.tokenizer.decode(ids, skip_special_tokens=False)
    assert decoded.replace("<IMG_CONTEXT>", "").replace("<img></img>", IMAGE) == p.unmark(text)


def test_content_parts_equal_placeholders(tiny):
    img = image(80, 60)
    parts = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What?"}]}]
    plain = [{"role": "user", "content": "<image>\nWhat?"}]
    a, b = tiny.processor(parts), tiny.processor(plain, [img])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])


def test_placeholder_count_must_match_images(tiny):
    with pytest.raises(PromptError, match="1 <image> placeholders but 2 images"):
        tiny.processor([{"role": "user", "content": "<image> what"}], [image(9, 9), image(9, 9)])
    with pytest.raises(PromptError, match="unknown message part type"):
        tiny.processor([{"role": "user", "content": [{"type": "audio"}]}])
    with pytest.raises(PromptError, match="'role' and 'content'"):
        tiny.processor([{"text": "hi"}])


def test_public_call_returns_logits(tiny):
    inputs = tiny.processor(question_messages("Describe.", 1), [image(300, 300)])
    logits = tiny(inputs["input_ids"], inputs["pixel_values"])
    assert logits.shape == (1, inputs["input_ids"].shape[1], tiny.cfg.text.vocab_size)
    with pytest.raises(PromptError, match="image tokens but no images"):
        tiny(inputs["input_ids"])


def test_greedy_is_deterministic_and_respects_max_new_tokens(tiny):
    a = tiny.chat("What does the chart show?", images=image(200, 100), max_new_tokens=5)
    b = tiny.chat("What does the chart show?", images=image(200, 100), max_new_tokens=5)
    assert a == b
    usage: list[dict] = []  # (counted as generated: bytes that are not yet whole characters re-encode longer)
    messages = question_messages("What does the chart show?", 1)
    texts = [
        "".join(p) for p in zip(*tiny.stream_batch([messages], [[image(200, 100)]], usage=usage, max_new_tokens=5))
    ]
    assert texts == [a] and 1 <= usage[0]["completion_tokens"] <= 5
    assert usage[0]["finish_reason"] == ("length" if usage[0]["completion_tokens"] == 5 else "stop")


def test_sampling_with_seed_is_reproducible_and_differs_from_greedy(tiny):
    kw = dict(max_new_tokens=12, temperature=1.5, top_p=0.95, top_k=50)
    a = tiny.chat("Describe this picture.", seed=1, **kw)
    b = tiny.chat("Describe this picture.", seed=1, **kw)
    c = tiny.chat("Describe this picture.", seed=2, **kw)
    assert a == b and a != c
    assert a != tiny.chat("Describe this picture.", max_new_tokens=12)


def test_top_k_one_is_greedy(tiny):
    greedy = tiny.chat("What is the total?", max_new_tokens=8)
    assert tiny.chat("What is the total?", max_new_tokens=8, temperature=1.0, top_k=1, seed=0) == greedy


def test_sampler_draws_from_the_filtered_distribution():
    """4,000 rows of one distribution, each its own step of one seed, drawn at once: the frequencies are the
    softmax renormalised over what top-k / top-p keep; a temperature-0 row is the argmax; the noise is a
    function of (seed, step, token) alone."""
    from vlstack.engine.sampler import gumbel, sample, seed_words

    n = 4000
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(n, -1)  # [n, 4]
    ones, seeds, steps = torch.ones(n), torch.tensor([seed_words(7)] * n), torch.arange(n)

    def freq(top_p=1.0, top_k=0, temperature=1.0, filtered=True):
        t = torch.full((n,), float(temperature))
        tokens = sample(logits, t, ones * top_p, torch.full((n,), top_k), seeds, steps, filtered)
        return torch.bincount(tokens, minlength=4) / n

    expected = {
        (1.0, 0): [0.5, 0.3, 0.15, 0.05],
        (0.7, 0): [0.625, 0.375, 0, 0],
        (1.0, 2): [0.625, 0.375, 0, 0],
        (1.0, 3): [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0],
    }
    for (top_p, top_k), want in expected.items():
        assert (freq(top_p, top_k) - torch.tensor(want)).abs().max() < 0.03
    assert (freq(filtered=False) - torch.tensor(expected[1.0, 0])).abs().max() < 0.03
    assert torch.equal(freq(temperature=0.0), torch.tensor([1.0, 0, 0, 0]))
    hot = torch.tensor([[1.0, 2.0, 3.0, 4.0]]).expand(n, -1)  # temperature 2 flattens: softmax(logits / 2)
    drawn = torch.bincount(sample(hot, ones * 2, ones, torch.zeros(n, dtype=torch.long), seeds, steps), minlength=4)
    assert (drawn / n - (hot[0] / 2).softmax(-1)).abs().max() < 0.03
    ids = torch.arange(50).expand(2, -1)
    same = gumbel(torch.tensor([seed_words(7)] * 2), torch.tensor([3, 3]), ids)
    assert torch.equal(same[0], same[1])
    assert not torch.equal(same[0], gumbel(torch.tensor([seed_words(8)]), torch.tensor([3]), ids[:1])[0])


def test_presence_and_frequency_penalties_as_openai_defines_them(tiny):
    """Greedy with penalties = a loop over the whole sequence lowering each generated token's logit by
    presence_penalty + count * frequency_penalty; they change the answer of a model that repeats itself."""
    kw = dict(presence_penalty=0.7, frequency_penalty=1.3)
    messages = question_messages("Describe this picture.", 0)
    ids = tiny.processor(messages)["input_ids"]  # [1, T]
    counts = torch.zeros(tiny.cfg.text.vocab_size)
    for _ in range(12):
        logits = tiny(ids)[0, -1] - kw["presence_penalty"] * (counts > 0) - kw["frequency_penalty"] * counts
        token = logits.argmax().item()
        counts[token] += 1
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
    expected = tiny.processor.decode(ids[0, -12:].tolist())
    assert tiny.chat("Describe this picture.", max_new_tokens=12, **kw) == expected
    plain = tiny.chat("Describe this picture.", max_new_tokens=12)
    assert plain != expected and counts.max() < 3
    with pytest.raises(PromptError, match=r"frequency_penalty must be a number in \[-2, 2\]"):
        tiny.chat("Hi", frequency_penalty=2.5)


def test_logit_bias_pushes_and_bans_tokens(tiny):
    plain = tiny.chat("Describe this picture.", max_new_tokens=6)
    word = tiny.processor.tokenizer.encode(" chart", add_special_tokens=False).ids[0]
    forced = tiny.chat("Describe this picture.", max_new_tokens=6, logit_bias={word: 100})
    assert forced == tiny.processor.decode([word] * 6) != plain
    first = tiny.processor.tokenizer.encode(plain, add_special_tokens=False).ids[0]
    banned = tiny.chat("Describe this picture.", max_new_tokens=6, logit_bias={first: -100})
    assert tiny.processor.tokenizer.encode(banned, add_special_tokens=False).ids[0] != first
    with pytest.raises(PromptError, match=r"logit_bias must be an object mapping token ids below 1029 "):
        tiny.chat("Hi", logit_bias={99999: 1})
    with pytest.raises(PromptError, match=r"logit_bias must be an object mapping token ids >= 0 to numbers in \["):
        tiny.chat("Hi", logit_bias={5: 101})


def test_stop_strings_and_streaming(tiny):
    full = tiny.chat("Describe this picture.", max_new_tokens=16)
    pieces = list(tiny.stream("Describe this picture.", max_new_tokens=16))
    assert "".join(pieces) == full and len(pieces) > 1
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip()
    cut = tiny.chat("Describe this picture.", max_new_tokens=16, stop=[stop])
    assert cut == full[: full.index(stop)]


def test_eos_ends_generation(tiny):
    """A model whose every step prefers <|im_end|> answers with nothing and stops at once."""
    eos = tiny.processor.token_id("<|im_end|>")
    with torch.no_grad():
        bias_before = tiny.model.lm_head.weight[eos].clone()
        tiny.model.lm_head.weight[eos] = tiny.model.lm_head.weight.abs().max() * 1e3
    try:
        steps = list(tiny.stream_batch([question_messages("Hi", 0)], max_new_tokens=20))
    finally:
        with torch.no_grad():
            tiny.model.lm_head.weight[eos] = bias_before
    assert len(steps) == 1 and steps[0] == [""]


def test_batched_generate_matches_single(tiny):
    convs = [question_messages("What colour is the shape?", 1), question_messages("Hi", 0)]
    imgs = [[image(120, 90)], []]
    batched = tiny.generate(convs, imgs, max_new_tokens=8)
    assert batched == [tiny.generate([c], [i], max_new_tokens=8)[0] for c, i in zip(convs, imgs)]


def test_over_long_prompt_is_refused(tiny):
    with pytest.raises(PromptError, match=r"the prompt is \d+ tokens, over the model's context of 8192 tokens"):
        tiny.chat("word " * 9000)


def test_bad_generation_options_are_named(tiny):
    with pytest.raises(PromptError, match="max_new_tokens must be an integer >= 1"):
        tiny.chat("Hi", max_new_tokens=0)
    with pytest.raises(PromptError, match=r"top_p must be a number in \(0, 1\]"):
        tiny.chat("Hi", top_p=0)
    with pytest.raises(PromptError, match=r"temperature must be a number in \[0, 2\]"):
        tiny.chat("Hi", temperature=-1)
    for bad in (
        dict(seed=2**70),
        dict(seed="7"),
        dict(stop=5),
        dict(stop=["a"] * 5),
        dict(top_k=1.5),
        dict(max_new_tokens=True),
        dict(temperature=3),
    ):
        with pytest.raises(PromptError, match=f"{next(iter(bad))} must be"):
            tiny.chat("Hi", **bad)


def test_history_as_messages_equals_pairs(tiny):
    a = question_messages("And now?", 0, history=[("Q1", "A1")])
    b = question_messages(
        "And now?", 0, history=[{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]
    )
    assert a == b


def test_chat_template_json_overrides_tokenizer_config(tmp_path):
    import shutil

    from vlstack.tiny import tiny_dir

    d = tmp_path / "m"
    shutil.copytree(tiny_dir(), d)
    (d / "chat_template.json").write_text(
        json.dumps({"chat_template": "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"})
    )
    vlm = vlstack.load(d, device="cpu")
    text, _ = vlm.processor.render([{"role": "user", "content": "hey"}])
    assert vlm.processor.unmark(text) == "<<hey>>"


def _bytes_decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def test_detokenizer_holds_back_half_characters():
    from vlstack.sampling import Detokenizer

    d = Detokenizer(_bytes_decode)
    sent = [d.push(b) for b in "né😀!".encode()]
    assert "".join(sent) == "né😀!"
    assert all("\ufffd" not in s for s in sent)
    assert sent[1] == "" and sent[2] == "é"  # é is two bytes: nothing until the second arrives


def test_detokenizer_stop_string_across_tokens():
    from vlstack.sampling import Detokenizer

    d = Detokenizer(_bytes_decode, ("END",))
    sent = [d.push(b) for b in b"abcEN"]
    assert "".join(sent) == "abc" and not d.stopped  # "EN" may begin the stop string: held back
    assert d.push(ord("D")) == "" and d.stopped
    assert d.flush() == ""
    e = Detokenizer(_bytes_decode, ("END",))
    sent = [e.push(b) for b in b"abcEN"]
    assert "".join(sent) + e.flush() == "abcEN"  # the stop string never came: the held text is sent
