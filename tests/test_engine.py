"""The continuous-batching engine: many concurrent requests with mixed adapters, each answered as if alone."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import DEVICE, image, rel_err

import vlstack
from vlstack.chat import question_messages
from vlstack.errors import ConfigError, PromptError
from vlstack.layers.lora import LoRASpec, add_adapter
from vlstack.sampling import SamplingParams

QUESTIONS = ["What is the total?", "Describe this picture.", "Which bar is the highest?", "Who signed the form?"]


def tiny_with_adapters():
    vlm = vlstack.load("tiny", device=DEVICE)
    for i, name in enumerate(("finance", "legal")):
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in add_adapter(vlm.model, name, LoRASpec(rank=4, alpha=16), seed=i):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        vlm.adapters[name] = LoRASpec(rank=4, alpha=16)
    return vlm


def collect(req) -> str:
    text = ""
    while (piece := req.out.get(timeout=120)) is not None:
        text += piece
    return text


@pytest.mark.parametrize("gpu_path", [False, True])
def test_32_concurrent_mixed_requests_match_one_at_a_time(gpu_path):
    """32 clients at once, images in some, two adapters and the base, 8 slots: each gets the answer it gets alone.
    gpu_path: a GPU's way of stepping (the static decode step: buckets, padding rows, slot routing; each step
    launched before the last one's tokens are read back; uncaptured here) under the engine's own traffic: rows
    finishing, compacted into low slots, joining mid-way."""
    vlm = tiny_with_adapters()
    engine = vlm.engine(max_batch=8, kv_budget=6000, static=gpu_path, overlap=gpu_path)
    cases = []
    for i in range(32):
        imgs = [image(60 + 7 * i, 40 + 3 * i, seed=i)] if i % 3 == 0 else []
        adapter = [None, "finance", "legal"][i % 3 if i % 4 else 0]
        cases.append((QUESTIONS[i % 4], imgs, adapter, 4 + i % 9))
    results = [None] * len(cases)

    def client(i):  # each client encodes its own prompt (images too), then waits for its answer
        q, imgs, adapter, n = cases[i]
        inputs = vlm.processor(question_messages(q, len(imgs)), imgs)
        results[i] = collect(engine.submit(inputs, adapter, SamplingParams(max_new_tokens=n)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    engine.close()
    expected = [vlm.chat(q, images=imgs, adapter=a, max_new_tokens=n) for q, imgs, a, n in cases]
    assert results == expected
    assert len(set(expected)) > 3  # adapters and questions really give different answers


def test_long_prompts_are_prefilled_in_chunks_while_others_decode():
    """With prefill_tokens 48, a prompt with an image (its image tokens split across chunks, an adapter on the
    LLM) goes in over several steps, each also decoding the request already running; both
    answers are those each request gets alone."""
    vlm = tiny_with_adapters()
    first = vlm.processor(question_messages("Hi there.", 0))
    long = vlm.processor(question_messages("What does the chart show, in detail?", 1), [image(120, 50, seed=3)])
    assert len(long["input_ids"][0]) > 3 * 48
    params = dict(max_new_tokens=30)
    alone = [greedy(vlm, first, None, params), greedy(vlm, long, "finance", params)]
    engine = vlm.engine(max_batch=4, prefill_tokens=48, background=False)
    a = engine.submit(first, None, SamplingParams(**params))
    engine.step()
    assert a in engine.running and a.generated == 1
    b = engine.submit(long, "finance", SamplingParams(**params))
    engine.step()  # b's first chunk, a's next token: one forward
    assert b in engine.prefilling and b.prefilled == 48 and a.generated == 2
    while b in engine.prefilling:
        engine.step()
    assert b.generated == 1 and a.generated == 2 + -(-len(long["input_ids"][0]) // 48) - 1
    while engine.running:
        engine.step()
    assert [collect(a), collect(b)] == alone


def greedy(vlm, inputs, adapter, params) -> str:
    """The request alone in an engine of its own, prefilled whole."""
    engine = vlm.engine(max_batch=1, background=False)
    req = engine.submit(inputs, adapter, SamplingParams(**params))
    while req.finished_at is None:
        engine.step()
    return collect(req)


def test_full_engine_queues_instead_of_refusing():
    vlm = tiny_with_adapters()
    engine = vlm.engine(max_batch=2, kv_budget=200)
    inputs = vlm.processor(question_messages("Hi", 0))
    reqs = [engine.submit(inputs, None, SamplingParams(max_new_tokens=30)) for _ in range(6)]
    answers = [collect(r) for r in reqs]
    engine.close()
    assert len(set(answers)) == 1 and all(r.finish_reason == "length" for r in reqs)


def test_sampled_tokens_get_their_logprobs():
    """A sampled token's log-probability is its own (not the likeliest's), the alternatives come likeliest
    first, only rows that ask get them, and the EOS that ends a row has none."""
    vlm = tiny_with_adapters()
    engine = vlm.engine(max_batch=4)
    inputs = vlm.processor(question_messages("Describe this picture.", 0))
    params = [SamplingParams(max_new_tokens=20, temperature=1.5, seed=s) for s in range(3)]
    reqs = [engine.submit(inputs, "legal", p, top_logprobs=k) for p, k in zip(params, (5, 0, None))]
    texts = [collect(r) for r in reqs]
    engine.close()
    for req, k in zip(reqs[:2], (5, 0)):
        assert [t for t, _, _ in req.logprobs] == req.detok.ids  # every generated token but an EOS
        assert len(req.logprobs) == req.generated - (req.finish_reason == "stop")
        assert all(len(top) == k for _, _, top in req.logprobs)
    assert reqs[2].logprobs == [] and texts[0] != texts[1]
    sampled = [(lp, top) for t, lp, top in reqs[0].logprobs if t != top[0][0]]
    assert sampled and all(lp < top[0][1] for lp, top in sampled)  # temperature 1.5 picked less likely tokens
    assert all([v for _, v in top] == sorted((v for _, v in top), reverse=True) for _, _, top in reqs[0].logprobs)
    engine = vlm.engine(max_batch=1)
    with pytest.raises(PromptError, match=r"top_logprobs must be in \[0, 20\]"):
        engine.submit(inputs, None, params[0], top_logprobs=21)
    engine.close()


def test_cancel_frees_the_slot():
    vlm = tiny_with_adapters()
    engine = vlm.engine(max_batch=1)
    inputs = vlm.processor(question_messages("Tell a long story.", 0))
    long = engine.submit(inputs, None, SamplingParams(max_new_tokens=5000))
    assert long.out.get(timeout=60) is not None  # it is generating
    engine.cancel(long)
    short = engine.submit(inputs, None, SamplingParams(max_new_tokens=3))
    assert collect(short) == vlm.chat("Tell a long story.", max_new_tokens=3)
    engine.close()
    assert long.generated < 5000


def test_upload_does_not_wait_for_the_device():
    """Host values reach the device as given; on a GPU without waiting for the work queued before (the next
    decode step is launched while the one before runs: a copy from pageable memory would wait for it)."""
    from vlstack.layers.step import upload

    t = upload([[1, 2], [3, 4]], DEVICE)
    assert t.dtype == torch.long and t.device.type == DEVICE and t.tolist() == [[1, 2], [3, 4]]
    assert upload([0.5], DEVICE, torch.float32).dtype == torch.float32
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000_000)  # ~1 s of the GPU busy
        start = time.perf_counter()
        upload(list(range(64)), DEVICE)
        assert time.perf_counter() - start < 0.1
        torch.cuda.synchronize()


def test_image_hash_takes_any_dtype_and_device():
    """Tiles in bfloat16 (numpy has no such type) or on the GPU hash by their bytes; a changed pixel changes it."""
    from vlstack.engine.feature_cache import image_hash

    tiles = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    digests = {image_hash(tiles.to(DEVICE)), image_hash(tiles.to(DEVICE, torch.bfloat16))}
    assert image_hash(tiles.to(DEVICE, torch.bfloat16)) == image_hash(tiles.to(torch.bfloat16))  # device-blind
    tiles[1, 2, 55, 55] += 1
    digests |= {image_hash(tiles), image_hash(tiles.to(torch.bfloat16))}
    assert len(digests) == 4


@pytest.mark.parametrize("vision_tokens", [8192, 3 * 256])  # one pass; passes of 3 tiles (256 tokens each)
def test_images_encoded_once_per_step_and_cached_by_content(vision_tokens):
    vlm = tiny_with_adapters()
    spec = LoRASpec(rank=4, alpha=16, parts=("language", "vision"))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # an adapter that changes the visual embeddings too
        for p in add_adapter(vlm.model, "vision", spec, seed=7):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    vlm.adapters["vision"] = spec
    engine = vlm.engine(max_batch=8, vision_tokens=vision_tokens)
    engine.adapter_changed("vision")
    passes = []
    vlm.model.vision_tower.register_forward_hook(lambda m, args, out: passes.append(args[0].shape[0]))
    page, chart = image(120, 50, seed=1), image(50, 90, seed=2)
    cases = [(page, None), (chart, "finance"), (page, "legal"), (page, "vision"), (chart, None)]

    def submit(img, adapter):
        inputs = vlm.processor(question_messages("What is the total?", 1), [img])
        return engine.submit(inputs, adapter, SamplingParams(max_new_tokens=6))

    with engine.lock:  # all five arrive before the engine's next step: one prefill batch
        reqs = [submit(img, a) for img, a in cases]
    answers = [collect(r) for r in reqs]
    tiles = {id(img): len(vlm.processor(question_messages("x", 1), [img])["pixel_values"]) for img in (page, chart)}
    # the new tiles once (page and chart for the base model, page again for "vision"), in passes of at most
    # vision_tokens encoder tokens; a pass may cut an image, each tile keeping its own adapter
    new = 2 * tiles[id(page)] + tiles[id(chart)]
    step = vision_tokens // 256
    assert passes == [min(step, new - a) for a in range(0, new, step)] and (step > new or len(passes) > 1)
    again = collect(submit(image(120, 50, seed=1), "legal"))  # the same page, a new PIL object: cached
    engine.close()
    assert sum(passes) == new
    assert (engine.images.hits, engine.images.misses) == (1, 3)  # in-batch repeats never reach the cache
    expected = [vlm.chat("What is the total?", images=[img], adapter=a, max_new_tokens=6) for img, a in cases]
    assert answers == expected and again == expected[2]
    assert answers[0] != answers[3]  # the vision adapter's own embeddings were used


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on():
    vlm = tiny_with_adapters()
    engine = vlm.engine(max_batch=4)
    assert engine.ready.wait(30)  # (its warm-up request done: the first step below is the test's)
    inputs = vlm.processor(question_messages("Hi", 0))
    forward, calls = vlm.model.forward, []

    def broken(*args, **kwargs):  # the first step raises (say, out of memory)
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated failure")
        return forward(*args, **kwargs)

    vlm.model.forward = broken
    first = engine.submit(inputs, "finance", SamplingParams(max_new_tokens=4))
    assert collect(first) == "" and first.finish_reason == "error" and "simulated failure" in first.error
    second = engine.submit(inputs, "finance", SamplingParams(max_new_tokens=4))
    assert collect(second) == vlm.chat("Hi", adapter="finance", max_new_tokens=4)
    engine.close()
    assert sorted(engine.free) == [0, 1, 2, 3]


def test_a_generated_image_token_is_an_ordinary_token():
    """Like transformers: without images, <IMG_CONTEXT> is embedded as any other token (a random model
    generates it now and then; the step must not fail)."""
    vlm = vlstack.load("tiny", device=DEVICE)
    ids = torch.tensor([[1, vlm.cfg.image_token_id, 7]], device=vlm.model.device)
    with torch.no_grad():
        assert torch.equal(vlm.model.embed(ids), vlm.model.language_model.embed_tokens(ids))


def test_a_kv_cache_that_does_not_fit_is_a_clear_error():
    vlm = vlstack.load("tiny", device=DEVICE)
    with pytest.raises(ConfigError, match="lower --max-batch or --max-model-len"):
        vlm.engine(max_batch=10**8)  # petabytes: beyond any machine's address space
    engine = vlm.engine(max_batch=2, max_len=512)
    assert engine.cache_bytes == engine.cache.k.numel() * 4 * 2  # float32 keys and values
    engine.close()


def test_step_sizes_default_by_device():
    """--prefill-tokens / --vision-tokens left out: the device's defaults (a GPU takes larger steps)."""
    from vlstack.engine.scheduler import STEP_TOKENS

    vlm = vlstack.load("tiny", device=DEVICE)
    engine = vlm.engine(max_batch=2, max_len=64, background=False)
    assert (engine.prefill_tokens, engine.vision_tokens) == STEP_TOKENS[vlm.model.device.type]
    assert STEP_TOKENS["cuda"][0] > STEP_TOKENS["cpu"][0] and STEP_TOKENS["cuda"][1] > STEP_TOKENS["cpu"][1]
    engine = vlm.engine(max_batch=2, max_len=64, prefill_tokens=100, vision_tokens=2000, background=False)
    assert (engine.prefill_tokens, engine.vision_tokens) == (100, 2000)


def _generate(vlm, decoder_of, prompts, rows, steps=3) -> torch.Tensor:
    """Prefill these prompts into slots 0..B-1 (each row with its adapter), then `steps` greedy decode steps by
    the Decoder decoder_of(cache) makes -> every step's logits [steps + 1, B, V]."""
    from vlstack.engine.runner import prefill
    from vlstack.layers.kv_cache import KVCache

    model = vlm.model
    cache = KVCache(vlm.cfg.text.kv_shape(4, 64), model.dtype, model.device)
    cache.k.normal_(generator=torch.Generator(model.device).manual_seed(5))  # garbage where nothing was written:
    cache.v.normal_(generator=torch.Generator(model.device).manual_seed(6))  # a row that read it would differ
    decoder, slots = decoder_of(cache), list(range(len(prompts)))
    with torch.inference_mode():
        out = [prefill(model, cache, [p.to(model.device) for p in prompts], slots, rows)]
        for i in range(steps):
            positions = [len(p) + i for p in prompts]
            out.append(decoder(out[-1].argmax(-1).tolist(), positions, slots, rows).clone())  # [B, V] (a graph's
            # output is overwritten by its next replay)
    return torch.stack(out)


PROMPTS = [torch.randint(10, 1000, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 12, 9)]


def test_static_decode_step_equals_each_row_alone():
    """The static decode step (the one captured on a GPU: batch padded to a bucket, keys to a power of two, LoRA
    routed by each row's slot) over rows of two adapters and the base: each row gets the logits it gets alone
    through the plain step, the padding row (3 rows -> a bucket of 4) and the cache's unwritten garbage
    changing nothing."""
    from vlstack.engine.runner import Decoder

    vlm = tiny_with_adapters()
    rows = ["finance", None, "legal"]
    static = _generate(vlm, lambda c: Decoder(vlm.model, c, static=True), PROMPTS, rows)
    assert Decoder(vlm.model, _cache(vlm), static=True).buckets == [1, 2, 4]
    for i, adapter in enumerate(rows):
        alone = _generate(vlm, lambda c: Decoder(vlm.model, c, static=False), PROMPTS[i : i + 1], [adapter])
        assert rel_err(static[:, i], alone[:, 0]) <= (1e-5 if DEVICE == "cpu" else 5e-5)  # (cuBLAS picks
        # other kernels, so other reduction orders, for 4 rows than for 1: 1.4e-5 seen on an H100)
    assert rel_err(static[:, 0], static[:, 2]) > 1e-2  # (the adapters do differ)


def _cache(vlm):
    from vlstack.layers.kv_cache import KVCache

    return KVCache(vlm.cfg.text.kv_shape(4, 64), vlm.model.dtype, vlm.model.device)


def test_static_decode_step_compiles_without_a_graph_break():
    """The proof on a CPU that the decode step can be captured: the static step compiled with fullgraph=True
    (backend "eager": tracing without code generation) over base rows and several adapters at once equals the
    uncompiled static step."""
    from vlstack.engine.runner import Decoder

    vlm = tiny_with_adapters()
    rows = ["finance", None, "legal"]
    eager = _generate(vlm, lambda c: Decoder(vlm.model, c, static=True), PROMPTS, rows)

    def compiled_decoder(cache):
        decoder = Decoder(vlm.model, cache, static=True)
        decoder._forward = torch.compile(decoder._forward, fullgraph=True, backend="eager")  # a graph break raises
        return decoder

    torch._dynamo.reset()
    assert torch.equal(_generate(vlm, compiled_decoder, PROMPTS, rows), eager)


def test_chat_keeps_its_engine_between_calls():
    """VLM.chat runs on the engine it used last (its KV cache and, on a GPU, its captured graphs kept) when that
    fits and is idle: the same answers as a fresh model's; an adapter added in between is used; a stream left
    mid-way leaves nothing behind for the next call."""
    vlm, fresh = vlstack.load("tiny", device=DEVICE), vlstack.load("tiny", device=DEVICE)
    first = vlm.chat("Describe the page.", max_new_tokens=12)
    engine = vlm._engine
    assert vlm.chat("What is the total?", max_new_tokens=8) == fresh.chat("What is the total?", max_new_tokens=8)
    assert vlm._engine is engine and first == fresh.chat("Describe the page.", max_new_tokens=12)
    for model in (vlm, fresh):
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in add_adapter(model.model, "late", LoRASpec(rank=4, alpha=16), seed=3):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    answer = vlm.chat("What is the total?", adapter="late", max_new_tokens=8)
    assert vlm._engine is engine and answer == fresh.chat("What is the total?", adapter="late", max_new_tokens=8)
    stream = vlm.stream_batch([question_messages("Describe the page.", 0)], max_new_tokens=12)
    next(stream), next(stream)  # two steps: a token or two into the answer (text may come later: no waiting for it)
    assert vlm._engine.running  # (the premise: mid-way)
    stream.close()  # left mid-way
    assert vlm._engine is None
    assert vlm.chat("Describe the page.", max_new_tokens=12) == first


def test_steps_run_ahead_of_reading_their_tokens_back():
    """overlap (a GPU's default): each decode step is launched before the step before's tokens are read back;
    texts, finish reasons ("stop" by a stop string or EOS, "length") and token counts are those of the plain
    way, sampled rows included (their draws keyed by step), and a cancelled request ends (a step later)."""
    vlm = tiny_with_adapters()
    base = vlm.chat("What is the total?", adapter="legal", max_new_tokens=24)
    stop = base[len(base) // 2 : len(base) // 2 + 3]  # met halfway through
    cases = [
        ("What is the total?", "legal", dict(max_new_tokens=24, stop=(stop,))),
        ("What is the total?", "finance", dict(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=5)),
        ("Hi there.", "legal", dict(max_new_tokens=7)),
        ("Describe the page.", None, dict(max_new_tokens=30, temperature=0.8, top_k=20, seed=1)),
    ]

    def run(overlap):
        engine = vlm.engine(max_batch=4, background=False, static=overlap, overlap=overlap)
        calls = []
        if overlap:
            ahead = engine._look_ahead
            engine._look_ahead = lambda: (calls.append(1), ahead())[1]
        reqs = [engine.submit(vlm.processor(question_messages(q, 0)), a, SamplingParams(**p)) for q, a, p in cases]
        cancelled = engine.submit(
            vlm.processor(question_messages("Hi there.", 0)), None, SamplingParams(max_new_tokens=50)
        )
        for i in range(200):
            if i == 5:
                engine.cancel(cancelled)
            if all(r.finished_at for r in reqs + [cancelled]):
                break
            engine.step()
        assert not overlap or len(calls) > 5
        assert cancelled.finished_at and cancelled.finish_reason is None and cancelled.generated < 10
        return [(collect(r), r.finish_reason, r.generated) for r in reqs]

    ahead, plain = run(True), run(False)
    assert ahead == plain
    assert {reason for _, reason, _ in plain} == {"stop", "length"}


def test_the_engine_thread_keeps_stepping_while_a_prompt_is_prefilled_in_chunks():
    """A prompt longer than a step's prefill budget, alone on a background engine: its chunks run one step
    after another (the thread does not idle while a prompt is part-way into the cache)."""
    vlm = vlstack.load("tiny", device=DEVICE)
    inputs = vlm.processor(question_messages("What does the chart show, in detail?", 1), [image(120, 50, seed=3)])
    chunks = -(-len(inputs["input_ids"][0]) // 16)
    assert chunks >= 10
    engine = vlm.engine(max_batch=2, prefill_tokens=16)
    start = time.perf_counter()
    req = engine.submit(inputs, None, SamplingParams(max_new_tokens=2))
    collect(req)
    engine.close()
    assert req.finish_reason in ("stop", "length") and time.perf_counter() - start < chunks * 0.5  # an idle wait is 1 s
