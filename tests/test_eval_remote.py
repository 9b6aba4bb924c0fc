"""`vlstack eval` against a remote OpenAI-compatible endpoint (vlstack.eval.remote): vlstack's own server on
the tiny model answers as the local run does; a flaky endpoint is retried; a bad key, an unknown model and an
unreachable host are one-line errors."""

from __future__ import annotations

import http.server
import json
import threading

import pytest
from test_eval_data import b64, png, write_tsv
from test_serve import running

import vlstack
from vlstack.errors import EndpointError
from vlstack.eval.remote import Endpoint
from vlstack.eval.runner import evaluate
from vlstack.serve.app import create_app


def bench(tmp_path):
    rows = [
        {"index": str(i), "image": b64(png(i)), "question": f"Question {i}?", "answer": "7", "category": "c"}
        for i in range(3)
    ]
    write_tsv(tmp_path / "b.tsv", rows)
    return tmp_path / "b.tsv"


def test_a_remote_endpoint_gives_the_local_runs_answers(tmp_path):
    data = bench(tmp_path)
    local = evaluate(
        vlstack.load("tiny", device="cpu"), "chartqa", data, tmp_path / "local", max_new_tokens=6, progress=False
    )
    with running(create_app(vlstack.load("tiny", device="cpu"), "tiny")) as base:
        remote = evaluate(
            Endpoint(base + "/v1", "tiny", concurrency=2),
            "chartqa",
            data,
            tmp_path / "remote",
            batch=2,
            max_new_tokens=6,
            progress=False,
        )
    lines = {
        name: [json.loads(x) for x in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
        for name in ("local", "remote")
    }
    assert [x["prediction"] for x in lines["remote"]] == [x["prediction"] for x in lines["local"]]
    assert [x["prompt_tokens"] for x in lines["remote"]] == [x["prompt_tokens"] for x in lines["local"]]
    assert remote["score"] == local["score"] and remote["model"] == "tiny" and remote["n"] == 3


class Flaky(http.server.BaseHTTPRequestHandler):
    """Answers by the model asked for: "busy" with 429 twice then an answer, "locked" 401, others 404."""

    calls: list[str] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Flaky.calls.append(body["model"])
        if body["model"] == "busy" and Flaky.calls.count("busy") <= 2:
            return self.reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
        if body["model"] == "busy":
            return self.reply(
                200,
                {
                    "choices": [{"message": {"content": "7"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 1},
                },
            )
        if body["model"] == "locked":
            return self.reply(401, {"error": {"message": "Incorrect API key provided"}})
        return self.reply(404, {"error": {"message": "The model does not exist"}})

    def reply(self, code, payload, headers=None):
        data = json.dumps(payload).encode()
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky():
    Flaky.calls = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_a_flaky_endpoint_is_retried_and_bad_ones_are_clear_errors(flaky, tmp_path):
    usage = []
    assert Endpoint(flaky, "busy", backoff=0).generate([[{"role": "user", "content": "hi"}]], usage=usage) == ["7"]
    assert Flaky.calls == ["busy"] * 3 and usage[0]["prompt_tokens"] == 5
    with pytest.raises(EndpointError, match=r"refused the API key \(401\): Incorrect API key provided"):
        Endpoint(flaky, "locked").generate([[{"role": "user", "content": "hi"}]])
    with pytest.raises(EndpointError, match=r"no model 'gpt-9' there, or no such URL \(404\)"):
        Endpoint(flaky, "gpt-9").generate([[{"role": "user", "content": "hi"}]])
    dead = Endpoint("http://127.0.0.1:9/v1", "x", retries=2, backoff=0, timeout=2)
    with pytest.raises(EndpointError, match="failed 3 times"):
        dead.generate([[{"role": "user", "content": "hi"}]])
    from vlstack.cli import main

    data = bench(tmp_path)
    args = ["eval", "chartqa", "--data", str(data), "--api-base", flaky, "--api-model", "locked"]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    assert main([*args, "--api-key-env", "VLSTACK_NO_SUCH_VARIABLE"]) == 2


def test_api_prices_give_the_runs_cost(flaky, tmp_path):
    """--price-in / --price-out (USD per million tokens): cost_usd from the endpoint's token counts; the
    summary also as a Markdown table."""
    summary = evaluate(
        Endpoint(flaky, "busy", backoff=0),
        "chartqa",
        bench(tmp_path),
        tmp_path / "o",
        progress=False,
        prices=(2.5, 10.0),
    )
    assert summary["score"] == 100.0 and summary["prompt_tokens"] == 15 and summary["completion_tokens"] == 3
    assert summary["cost_usd"] == pytest.approx((15 * 2.5 + 3 * 10.0) / 1e6)
    md = (tmp_path / "o" / "summary.md").read_text()
    assert "| all | busy | 3 | 100.0 |" in md and "cost (USD)" in md
    from vlstack.cli import main

    args = ["eval", "chartqa", "--data", str(bench(tmp_path)), "--api-base", flaky, "--api-model", "busy"]
    assert main([*args, "--price-in", "-1"]) == 2
