"""The OpenAI-compatible server, driven by the official openai client over loopback HTTP."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import threading
import time

import httpx
import openai
import pytest
import torch
from conftest import image

import vlstack
from vlstack.adapters import save_adapter
from vlstack.errors import ConfigError
from vlstack.layers.lora import LoRASpec, add_adapter
from vlstack.parallel.serving import free_port
from vlstack.serve.app import create_app
from vlstack.serve.state import ServeConfig


def data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A PEFT adapter with random (trained-looking) weights."""
    vlm = vlstack.load("tiny", device="cpu")
    spec = LoRASpec(rank=4, alpha=16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in add_adapter(vlm.model, "finance", spec, seed=0):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return save_adapter(vlm.model, "finance", tmp_path_factory.mktemp("ad") / "finance", spec)


@contextlib.contextmanager
def running(app):
    """Serve app with uvicorn on a free loopback port; yields its base URL."""
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(adapter_dir, tmp_path_factory):
    vlm = vlstack.load("tiny", device="cpu")
    vlm.load_adapter("finance", adapter_dir)
    images = tmp_path_factory.mktemp("images")
    image(64, 48, seed=9).save(images / "page.png")
    app = create_app(vlm, "tiny", ServeConfig(image_dir=images, adapter_dir=adapter_dir.parent))
    with running(app) as base:
        yield base, images, app.state.engine


@pytest.fixture(scope="module")
def reference(adapter_dir):
    vlm = vlstack.load("tiny", device="cpu")
    vlm.load_adapter("finance", adapter_dir)
    return vlm


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def test_text_and_image_chat_match_vlm_chat(client, reference):
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "What is the total?"}], temperature=0, max_tokens=8
    )
    assert r.choices[0].message.content == reference.chat("What is the total?", max_new_tokens=8)
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    img = image(120, 80, seed=3)
    content = [{"type": "image_url", "image_url": {"url": data_url(img)}}, {"type": "text", "text": "Describe."}]
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}], temperature=0, max_tokens=6
    )
    assert r.choices[0].message.content == reference.chat("Describe.", images=img, max_new_tokens=6)
    assert r.usage.prompt_tokens > 2 * reference.cfg.tokens_per_tile  # the image's tokens are counted


def test_adapter_is_chosen_by_the_model_field(client, reference):
    messages = [{"role": "user", "content": "Summarise the report."}]
    a = client.chat.completions.create(model="finance", messages=messages, temperature=0, max_tokens=8)
    b = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=8)
    assert a.choices[0].message.content == reference.chat("Summarise the report.", adapter="finance", max_new_tokens=8)
    assert a.choices[0].message.content != b.choices[0].message.content


def test_32_concurrent_mixed_requests_answered_as_vlm_chat(client, reference):
    """32 clients at once, base model and adapter, with and without images, streamed and not."""
    from concurrent.futures import ThreadPoolExecutor

    questions = ["What is the total?", "Describe.", "Which bar is highest?", "Who signed?"]
    cases = [
        (
            questions[i % 4],
            image(50 + 9 * i, 40 + 5 * i, seed=i) if i % 3 == 0 else None,
            ["tiny", "finance"][i % 2],
            3 + i % 6,
            i % 4 == 1,
        )
        for i in range(32)
    ]

    def ask(case):
        q, img, model, n, stream = case
        content = [{"type": "text", "text": q}]
        if img is not None:
            content.insert(0, {"type": "image_url", "image_url": {"url": data_url(img)}})
        r = client.with_options(timeout=120).chat.completions.create(
            model=model, messages=[{"role": "user", "content": content}], temperature=0, max_tokens=n, stream=stream
        )
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
        return r.choices[0].message.content

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, cases))
    expected = [
        reference.chat(q, images=img, adapter=None if m == "tiny" else m, max_new_tokens=n) for q, img, m, n, _ in cases
    ]
    assert answers == expected and len(set(expected)) > 8


def test_streaming_matches_and_reports_usage(client):
    messages = [{"role": "user", "content": "Read the text in the document."}]
    whole = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=10)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            temperature=0,
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_sampling_options_n_seed_stop_and_penalties(client, reference):
    messages = [{"role": "user", "content": "Describe this picture."}]
    kw = dict(model="tiny", messages=messages, max_tokens=12, temperature=1.2, top_p=0.9, seed=7, n=2)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len(a.choices) == 2
    greedy = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12)
    full = greedy.choices[0].message.content
    stop = full[4:6]
    cut = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12, stop=stop)
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    top_k = dict(temperature=1.0, seed=3, extra_body={"top_k": 1})  # vLLM's extension: the likeliest token only
    assert client.chat.completions.create(**{**kw, **top_k}).choices[0].message.content == full
    sampled = client.chat.completions.create(**{**kw, "temperature": 1.0, "seed": 3}).choices[0].message.content
    assert sampled != full
    with pytest.raises(openai.BadRequestError, match="'top_k' must be an integer >= -1"):
        client.chat.completions.create(**kw, extra_body={"top_k": "many"})
    penalties = dict(presence_penalty=0.7, frequency_penalty=1.3)
    kw = dict(model="finance", messages=messages, temperature=0, max_tokens=12)
    penalised = client.chat.completions.create(**kw, **penalties).choices[0].message.content
    assert penalised == reference.chat("Describe this picture.", adapter="finance", max_new_tokens=12, **penalties)
    assert penalised != client.chat.completions.create(**kw).choices[0].message.content
    word = reference.processor.tokenizer.encode(" chart", add_special_tokens=False).ids[0]
    biased = client.chat.completions.create(**kw, logit_bias={str(word): 100}).choices[0].message.content
    assert biased == reference.processor.decode([word] * 12)


def test_logprobs_are_the_models_own(client, reference):
    """logprobs / top_logprobs: each generated token's log-probability and its likeliest alternatives, as the
    model computes them with the request's adapter over the whole sequence; streamed, the same tokens."""
    messages = [{"role": "user", "content": "Summarise the report."}]
    kw = dict(model="finance", messages=messages, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    ids = reference.processor(messages)["input_ids"]  # [1, T]: the reference greedy, recomputed from scratch
    for item in content:
        lp = reference(ids, adapter="finance")[0, -1].float().log_softmax(-1)  # [V]
        top = lp.topk(3)
        assert item.token == reference.processor.decode([top.indices[0].item()])
        assert item.bytes == list(item.token.encode())
        assert abs(item.logprob - top.values[0].item()) <= 1e-4
        assert [t.token for t in item.top_logprobs] == [reference.processor.decode([i]) for i in top.indices.tolist()]
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        ids = torch.cat([ids, top.indices[:1][None]], 1)
    assert len(content) == 6 and "".join(item.token for item in content) == r.choices[0].message.content
    streamed = [c.choices[0].logprobs for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    items = [item for lp in streamed if lp is not None for item in lp.content]
    assert [(i.token, i.logprob) for i in items] == [(i.token, pytest.approx(i.logprob, abs=1e-5)) for i in content]
    plain = client.chat.completions.create(model="finance", messages=messages, temperature=0, max_tokens=6)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


def test_models_list_and_hot_load_unload(server, client, adapter_dir):
    ids = {m.id: m for m in client.models.list().data}
    assert set(ids) == {"tiny", "finance"}
    assert client.models.retrieve("finance") == ids["finance"]
    with pytest.raises(openai.NotFoundError, match="'legal' does not exist"):
        client.models.retrieve("legal")
    base = server[0]
    r = httpx.post(base + "/v1/adapters", json={"name": "legal", "path": str(adapter_dir)})
    assert r.status_code == 200
    assert "legal" in {m.id for m in client.models.list().data}
    r = client.chat.completions.create(model="legal", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.choices[0].message.content is not None
    assert httpx.delete(base + "/v1/adapters/legal").status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="legal", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    r = httpx.post(base + "/v1/adapters", json={"name": "finance", "path": str(adapter_dir)})
    assert r.status_code == 409
    r = httpx.post(base + "/v1/adapters", json={"name": "x", "path": "nonexistent"})
    assert r.status_code == 400 and "not a PEFT adapter directory" in r.json()["error"]["message"]
    r = httpx.post(base + "/v1/adapters", json={"name": "x", "path": "/etc"})
    assert r.status_code == 400 and "under the server's adapter directory" in r.json()["error"]["message"]
    assert httpx.get(base + "/health").json() == {"status": "ok"}


def test_errors_have_openai_shape_and_status(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found" and "'gpt-5' does not exist" in e.value.body["message"]
    bad = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]
    with pytest.raises(openai.BadRequestError, match="could not decode image"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": bad}])
    remote = [{"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest"}}]
    with pytest.raises(openai.BadRequestError, match="refused"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": remote}])
    outside = [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]
    with pytest.raises(openai.BadRequestError, match="under the server's image directory"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": outside}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 9000}])
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="'temperature' must be"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=5)
    r = httpx.post(server[0] + "/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    hi = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    refused = [  # what the server does not implement is refused, not ignored
        ({"tools": [tool]}, "tools", "'tools' is not supported"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "'audio' is not supported"),
        ({"response_format": {"type": "json_object"}}, "response_format", "'response_format' is not supported"),
        ({"logit_bias": {"99999": 10}}, "logit_bias", "'logit_bias' must be an object mapping token ids below"),
        ({"logit_bias": ["5"]}, "logit_bias", "'logit_bias' must be an object mapping"),
        ({"presence_penalty": 3}, "presence_penalty", r"'presence_penalty' must be a number in \[-2, 2\]"),
        ({"top_logprobs": 2}, "top_logprobs", "'top_logprobs' must be given with 'logprobs': true"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", r"'top_logprobs' must be an integer in \[0, 20\]"),
    ]
    for extra, param, message in refused:
        with pytest.raises(openai.BadRequestError, match=message) as e:
            client.chat.completions.create(model="tiny", messages=hi, max_tokens=2, **extra)
        assert e.value.body["param"] == param
    asks_nothing = dict(tools=[], response_format={"type": "text"}, tool_choice="none", frequency_penalty=0)
    assert client.chat.completions.create(model="tiny", messages=hi, max_tokens=2, **asks_nothing).choices
    system = [{"role": "system", "content": "Be brief."}, *hi]
    developer = [{"role": "developer", "content": "Be brief."}, *hi]  # OpenAI's newer name for the system role
    a, b = (
        client.chat.completions.create(model="tiny", messages=m, max_tokens=4, temperature=0)
        for m in (system, developer)
    )
    assert a.choices[0].message.content == b.choices[0].message.content and a.usage == b.usage
    local = [{"type": "image_url", "image_url": {"url": "page.png"}}, {"type": "text", "text": "What?"}]
    ok = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": local}], max_tokens=2)
    assert ok.usage.prompt_tokens > 0


@pytest.mark.slow
def test_vlstack_serve_command_answers(adapter_dir):
    """The README's main job: `vlstack serve` on the tiny model, with an adapter, answering over HTTP."""
    import subprocess
    import sys

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vlstack.cli",
        "serve",
        "--port",
        str(port),
        "--adapter",
        f"finance={adapter_dir}",
        "--vision-tokens",
        "512",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, up = time.time() + 60, False
        while time.time() < deadline and not up and proc.poll() is None:
            try:
                up = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                time.sleep(0.2)
        assert up, proc.stderr.read() if proc.poll() is not None else "server did not start"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert {m.id for m in client.models.list().data} == {"tiny", "finance"}
        r = client.chat.completions.create(
            model="finance", messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0
        )
        assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run(
        [sys.executable, "-m", "vlstack.cli", "serve", "--adapter", "oops"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "--adapter takes NAME=DIR" in bad.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "vlstack.cli", "serve", "--vision-tokens", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "vision_tokens must be positive" in bad.stderr


def test_readiness_is_reported_apart_from_liveness(adapter_dir):
    """/health/ready: 200 once a first request has gone through the engine, 503 with the reason once the engine
    has stopped, while /health (liveness) still answers 200."""
    app = create_app(vlstack.load("tiny", device="cpu"), "tiny", ServeConfig())
    engine = app.state.engine
    with running(app) as base:
        assert engine.ready.wait(60)
        r = httpx.get(base + "/health/ready")
        assert r.status_code == 200 and r.json() == {"status": "ready", "model": "tiny", "tp": 1}
        engine.close()
        r = httpx.get(base + "/health/ready")
        assert r.status_code == 503 and r.json() == {"status": "unavailable", "reason": "the engine has stopped"}
        assert httpx.get(base + "/health").json() == {"status": "ok"}


@pytest.mark.parametrize("stream", [True, False])
def test_client_going_away_frees_its_slot(server, stream):
    base, _, engine = server
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Tell a long story."}],
        "stream": stream,
        "max_tokens": 4000,
        "temperature": 0,
    }
    with httpx.Client(timeout=httpx.Timeout(30, read=1.0)) as http:
        if stream:
            with http.stream("POST", base + "/v1/chat/completions", json=body) as r:
                lines = r.iter_lines()
                while '"content": ""' in (line := next(lines)) or not line:  # until the first text arrives
                    pass
                req = engine.running[0]
        else:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up on a long answer and hangs up
                http.post(base + "/v1/chat/completions", json=body)
            req = engine.running[0]
    deadline = time.time() + 5
    while req in engine.running and time.time() < deadline:
        time.sleep(0.05)
    # (the tiny model needs well over 5 s for 4000 tokens, so it was stopped, not finished)
    assert req not in engine.running and req.cancelled and req.finish_reason is None and req.generated < 4000


@pytest.fixture(scope="module")
def limits_server(tmp_path_factory):
    """A server that fetches http(s) images, queues one request at most and takes bodies up to 50 kB; and a
    plain HTTP server of image files on loopback."""
    import functools
    import http.server

    files = tmp_path_factory.mktemp("web")
    image(90, 60, seed=4).save(files / "page.png")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(files))
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    vlm = vlstack.load("tiny", device="cpu")
    config = ServeConfig(
        allow_http_images=True,
        allow_private_image_hosts=True,
        max_queue=1,
        max_batch=2,
        max_body_mb=0.05,
        max_model_len=1000,
    )
    app = create_app(vlm, "tiny", config)
    with running(app) as base:
        yield base, f"http://127.0.0.1:{web.server_address[1]}", files, app.state.engine
    web.shutdown()


def test_http_images_fetched_and_encoded_once(limits_server, reference):
    base, web, files, engine = limits_server
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)

    def ask(url):
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": content}], max_tokens=6, temperature=0
        )
        return r.choices[0].message.content

    passes = []
    hook = engine.model.vision_tower.register_forward_hook(lambda *a: passes.append(1))
    try:
        first, second = ask(web + "/page.png"), ask(web + "/page.png")
    finally:
        hook.remove()
    expected = reference.chat("What is it?", images=[files / "page.png"], max_new_tokens=6)
    assert first == second == expected and len(passes) == 1  # the second ask reused the page's embeddings
    text = httpx.get(base + "/metrics").text
    assert "vlstack_image_cache_hits_total 1" in text and "vlstack_image_cache_misses_total 1" in text
    with pytest.raises(openai.BadRequestError, match="HTTP 404"):
        ask(web + "/missing.png")


def test_overload_gets_503_and_big_bodies_413(limits_server):
    base, _, _, engine = limits_server
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    results = []
    with engine.lock:  # the engine is busy: a request waits in the queue
        waiting = threading.Thread(
            target=lambda: results.append(httpx.post(base + "/v1/chat/completions", json=body, timeout=60))
        )
        waiting.start()
        deadline = time.time() + 10
        while engine.waiting.qsize() < 1 and time.time() < deadline:
            time.sleep(0.02)
        over = httpx.post(base + "/v1/chat/completions", json=body, timeout=10)
    waiting.join(timeout=60)
    assert over.status_code == 503 and over.headers["retry-after"] == "1"
    assert over.json()["error"]["code"] == "server_overloaded" and over.json()["error"]["type"] == "server_error"
    assert results[0].status_code == 200  # the queued one is answered once the engine is free
    big = {**body, "messages": [{"role": "user", "content": "x" * 60_000}]}
    r = httpx.post(base + "/v1/chat/completions", json=big, timeout=10)
    assert r.status_code == 413 and "over the limit" in r.json()["error"]["message"]

    def chunked():  # no content-length: the limit is checked on what arrives
        yield json.dumps(big).encode()

    r = httpx.post(base + "/v1/chat/completions", content=chunked(), timeout=10)
    assert r.status_code == 413
    long = {**body, "messages": [{"role": "user", "content": "word " * 1200}]}  # within the body limit
    r = httpx.post(base + "/v1/chat/completions", json=long, timeout=10)  # over --max-model-len 1000
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    with pytest.raises(ConfigError, match="max_batch must be positive"):
        ServeConfig(max_batch=0)
    with pytest.raises(ConfigError, match="vision_tokens must be positive"):
        ServeConfig(vision_tokens=0)


@pytest.fixture(scope="module")
def tenant_server(adapter_dir, tmp_path_factory):
    from vlstack.serve.auth import AuditLog, read_keys

    d = tmp_path_factory.mktemp("tenants")
    (d / "keys.yaml").write_text(
        "keys:\n"
        "  - {id: finance-team, key: sk-fin, models: [finance]}\n"
        "  - {id: legal-team, key: sk-law, models: [tiny, legal]}\n"
        "  - {id: ops, key: sk-ops, models: ['*'], admin: true}\n"
    )
    vlm = vlstack.load("tiny", device="cpu")
    vlm.load_adapter("finance", adapter_dir)
    vlm.load_adapter("legal", adapter_dir)
    app = create_app(vlm, "tiny", tenants=read_keys(d / "keys.yaml"), audit=AuditLog(d / "audit.jsonl"))
    with running(app) as base:
        yield base, d


def test_tenants_see_and_use_only_their_models(tenant_server):
    base, d = tenant_server

    def client(key):
        return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)

    hi = [{"role": "user", "content": "secret figures: 42"}]
    with pytest.raises(openai.AuthenticationError):
        client("sk-wrong").models.list()
    assert httpx.get(base + "/metrics").status_code == 401  # every endpoint but /health is guarded
    assert httpx.get(base + "/health").status_code == 200
    assert {m.id for m in client("sk-fin").models.list().data} == {"finance"}
    assert {m.id for m in client("sk-ops").models.list().data} == {"tiny", "finance", "legal"}
    assert client("sk-fin").chat.completions.create(model="finance", messages=hi, max_tokens=3).choices
    with pytest.raises(openai.NotFoundError) as other:  # another tenant's adapter: as if it did not exist
        client("sk-fin").chat.completions.create(model="legal", messages=hi, max_tokens=3)
    with pytest.raises(openai.NotFoundError) as missing:
        client("sk-fin").chat.completions.create(model="nothing", messages=hi, max_tokens=3)
    assert other.value.body["message"].replace("legal", "X") == missing.value.body["message"].replace("nothing", "X")
    with pytest.raises(openai.NotFoundError) as hidden:  # nor can its card be fetched
        client("sk-fin").models.retrieve("legal")
    assert hidden.value.body["message"] == other.value.body["message"]
    assert client("sk-ops").models.retrieve("legal").parent == "tiny"
    body = {"name": "x", "path": "/tmp"}
    assert httpx.post(base + "/v1/adapters", json=body, headers={"Authorization": "Bearer sk-law"}).status_code == 403
    lines = [json.loads(x) for x in (d / "audit.jsonl").read_text().splitlines()]
    ok = [x for x in lines if x["path"] == "/v1/chat/completions" and x["status"] == 200]
    assert ok and ok[0]["key_id"] == "finance-team" and ok[0]["model"] == "finance"
    assert ok[0]["completion_tokens"] >= 1 and ok[0]["prompt_tokens"] > 0
    assert any(x["status"] == 404 and x["key_id"] == "finance-team" for x in lines)
    assert "secret figures" not in (d / "audit.jsonl").read_text()  # no content unless asked
    assert "sk-fin" not in (d / "audit.jsonl").read_text()


def test_metrics_in_prometheus_format(tenant_server):
    base, _ = tenant_server
    ops = openai.OpenAI(base_url=base + "/v1", api_key="sk-ops", max_retries=0)
    for model in ("tiny", "legal"):
        ops.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    list(
        ops.chat.completions.create(
            model="legal", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
        )
    )
    assert httpx.get(base + "/wp-admin/x", headers={"Authorization": "Bearer sk-ops"}).status_code == 404
    text = httpx.get(base + "/metrics", headers={"Authorization": "Bearer sk-ops"}).text
    assert 'vlstack_http_requests_total{path="other",status="404"} 1' in text and "wp-admin" not in text
    assert 'vlstack_requests_total{model="legal",status="200"} 2' in text
    assert 'vlstack_completion_tokens_total{model="tiny"} 3' in text
    assert 'vlstack_time_to_first_token_seconds_bucket{model="legal",le="+Inf"} 2' in text
    assert "# TYPE vlstack_request_seconds histogram" in text and "vlstack_queue_depth 0" in text
    assert 'vlstack_http_requests_total{path="/v1/chat/completions",status="200"}' in text


def test_a_model_failure_is_a_500_in_openai_shape(server, client):
    model = server[2].model
    forward = model.forward

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    model.forward = broken
    try:
        with pytest.raises(openai.InternalServerError, match="the model failed on this request"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        with pytest.raises(openai.APIError, match="simulated failure"):
            list(
                client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
                )
            )
    finally:
        model.forward = forward
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_audit_log_keeps_content_only_when_asked(tmp_path):
    from vlstack.serve.auth import AuditLog, read_keys

    messages = [{"role": "user", "content": "the merger closes on Friday"}]
    AuditLog(tmp_path / "a.jsonl").write(key_id="k", model="m", content=messages)
    AuditLog(tmp_path / "b.jsonl", content=True).write(key_id="k", model="m", content=messages)
    plain, full = (json.loads((tmp_path / f).read_text()) for f in ("a.jsonl", "b.jsonl"))
    assert "content" not in plain and plain["key_id"] == "k" and full["content"] == messages
    (tmp_path / "keys.yaml").write_text("keys:\n  - {id: a, key: k1}\n")
    with pytest.raises(ConfigError, match="key 1 needs 'id', 'key' and a 'models' list"):
        read_keys(tmp_path / "keys.yaml")
    (tmp_path / "keys.yaml").write_text("keys:\n  - {id: a, key: k1, models: [x]}\n  - {id: b, key: k1, models: [y]}\n")
    with pytest.raises(ConfigError, match="the same key appears twice"):
        read_keys(tmp_path / "keys.yaml")


def test_best_of_with_a_critic_answers_with_its_pick_and_counts_every_sample(server, reference):
    """The extension fields best_of (N) and critic (a loaded adapter): N completions sampled, one choice back,
    the critic's best (its scores and pick in `best_of`), the usage counting all N; bad uses refused by name."""
    import httpx

    from vlstack.train.critic import critic_scores

    url = data_url(image(50, 40, seed=5))
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is shown?"}]
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 4}
    r = httpx.post(server[0] + "/v1/chat/completions", json={**body, "best_of": 3, "critic": "finance"}, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    (choice,) = out["choices"]
    best = out["best_of"]
    assert best["n"] == 3 and best["critic"] == "finance" and len(best["scores"]) == 3
    assert best["scores"][best["chosen"]] == max(best["scores"])
    text = choice["message"]["content"]
    mine = critic_scores(reference, "finance", "What is shown?", [url], [text])[0]
    assert mine == pytest.approx(best["scores"][best["chosen"]], abs=1e-4)  # the pick is the text returned
    assert out["usage"]["completion_tokens"] > len(reference.processor.tokenizer.encode(text, add_special_tokens=False))
    for extra, field in [
        ({"best_of": 3, "critic": "nope"}, "critic"),
        ({"best_of": 100, "critic": "finance"}, "best_of"),
        ({"best_of": 3, "critic": "finance", "stream": True}, "best_of"),
        ({"critic": "finance"}, "best_of"),
    ]:
        bad = httpx.post(server[0] + "/v1/chat/completions", json={**body, **extra}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == field, bad.text
