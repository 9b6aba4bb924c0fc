"""Trust, round two: nothing that failed is reported as success, nothing is deleted or exposed that is not
vlstack's, every option is checked before work, and bad input is one line naming the problem."""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_serve import adapter_dir  # noqa: F401 (a fixture)
from test_train import write_dataset
from test_trust import web  # noqa: F401 (a fixture)

import vlstack
from vlstack.train.jobs import Job
from vlstack.train.multi import train
from vlstack.train.running import Diverged


@pytest.fixture(scope="module")
def tiny():
    return vlstack.load("tiny", device="cpu")


def test_a_diverging_job_stops_at_its_first_non_finite_loss_and_writes_nothing(tmp_path):
    data = write_dataset(tmp_path / "data", "fin", 4, True)
    job = Job.of("fin", data, tmp_path / "out" / "fin", rank=4, batch_size=2, steps=6, lr=1e6, save_every=1)
    vlm = vlstack.load("tiny", device="cpu")
    stopped = r"job 'fin': (the (loss|gradient) is nan|its weights are not finite) at step"
    with pytest.raises(Diverged, match=stopped) as e:
        train(vlm, [job], 4, verbose=False)
    step = int(str(e.value).split(" at step ")[1].split()[0].rstrip(":"))
    assert 1 < step <= 6
    assert not (tmp_path / "out" / "fin").exists()  # no adapter
    state = tmp_path / "out" / "fin.train" / "checkpoint" / "state.pt"  # the checkpoints before it are finite
    saved = torch.load(state, weights_only=True)
    assert saved["step"] == step - 1 and all(torch.isfinite(t).all() for t in saved["adapter"])
    metrics = [json.loads(line) for line in (tmp_path / "out" / "fin.train" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["loss"] == m["loss"] for m in metrics) and metrics[-1]["step"] == step - 1


def test_answers_cut_off_by_max_len_are_counted_before_training(tmp_path, capsys, tiny):
    from vlstack.train.data import encode_example, read_dataset
    from vlstack.train.jobs import JobError

    data = write_dataset(tmp_path / "data", "fin", 6, True)
    examples = read_dataset(data)
    lengths = [len(encode_example(tiny.processor, ex, 10**6)["input_ids"]) for ex in examples]
    # the ids without pixels count the images' tokens as tiling them does
    assert lengths == [len(encode_example(tiny.processor, ex, 10**6, ids_only=True)["input_ids"]) for ex in examples]
    long, short = "Tell me, in all the detail you can, what " * 8, "What?"
    lines = [
        {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "Red."}]}
        for q in (long, short, long, short, short)
    ]
    data = tmp_path / "cut.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out" / "fin"
    with pytest.raises(JobError, match=r"job 'fin': max_len 8 cuts off the answer of every example"):
        train(tiny, [Job.of("fin", data, out, rank=2, batch_size=2, steps=1, max_len=8)], 4, verbose=False)
    assert not out.exists() and not out.with_name("fin.train").exists()
    # some cut: a warning with the count, and training goes on
    train(tiny, [Job.of("fin", data, out, rank=2, batch_size=2, steps=1, max_len=40)], 4)
    assert "cuts off the answer of 2 of 5 examples" in capsys.readouterr().err and out.is_dir()


@pytest.fixture(scope="module")
def server():
    from test_serve import running

    from vlstack.serve.app import create_app
    from vlstack.serve.state import ServeConfig

    vlm = vlstack.load("tiny", device="cpu")
    app = create_app(vlm, "tiny", ServeConfig(max_batch=4))
    with running(app) as base:
        yield base, vlm


def _post(base: str, body=None, raw: bytes | None = None, path: str = "/v1/chat/completions", method: str = "POST"):
    import httpx

    if raw is not None:
        return httpx.request(method, base + path, content=raw, headers={"content-type": "application/json"}, timeout=60)
    return httpx.request(method, base + path, json=body, timeout=60)


HI = [{"role": "user", "content": "hi"}]


def test_a_null_max_completion_tokens_leaves_max_tokens_and_n_0_is_refused(server):
    base, _ = server
    greedy = {"model": "tiny", "messages": HI, "temperature": 0}  # (sampled, an answer may end early at EOS)
    r = _post(base, {**greedy, "max_tokens": 4, "max_completion_tokens": None})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    r = _post(base, {**greedy, "max_completion_tokens": 3, "max_tokens": None})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    r = _post(base, {"model": "tiny", "messages": HI, "n": 0, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


@pytest.mark.parametrize(
    "raw, message",
    [
        (b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (
            b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}",
            "a number too long",
        ),
        (
            b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}",
            "a number too long",
        ),
    ],
)
def test_bodies_too_deep_or_with_huge_numbers_are_a_400(server, raw, message):
    r = _post(server[0], raw=raw)
    assert r.status_code == 400 and message in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_paths_and_methods_answer_in_openai_shape(server):
    base, _ = server
    for path, method, status in (
        ("/v1/nope", "POST", 404),
        ("/v1/chat/completions", "GET", 405),
        ("/v1/models", "DELETE", 405),
    ):
        r = _post(base, raw=b"", path=path, method=method)
        error = r.json()["error"]
        assert r.status_code == status and path in error["message"] and error["type"] == "invalid_request_error"


def test_image_tag_in_a_string_content_is_text(server):
    base, vlm = server
    text = "What does the <image> tag in HTML do?"
    r = _post(base, {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 1})
    as_part = vlm.processor([{"role": "user", "content": [{"type": "text", "text": text}]}])["input_ids"]
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == as_part.shape[1]
    assert vlm.processor.img_start not in as_part[0].tolist()


def test_the_python_api_refuses_what_it_cannot_answer(tiny):
    from vlstack.errors import PromptError

    m = [{"role": "user", "content": "hi"}]
    cases = [
        (lambda: tiny.generate([m, m, m], adapters=[None], max_new_tokens=1), "adapters: 1 for 3 conversations"),
        (lambda: tiny.generate([m, m, m], images=[[]], max_new_tokens=1), "images: 1 for 3 conversations"),
        (lambda: tiny.generate([], max_new_tokens=1), "a non-empty list"),
        (lambda: tiny.chat("\ud800", max_new_tokens=1), "not valid Unicode"),
        (lambda: tiny(torch.tensor([[1.0, 2.0]])), "integer token ids"),
        (lambda: tiny(torch.tensor([[1, 10**6]])), "outside the vocabulary"),
        (lambda: tiny(torch.tensor([[-1, 2]])), "outside the vocabulary"),
        (lambda: tiny.generate([[{"role": "wizard", "content": "hi"}]], max_new_tokens=1), "unknown message role"),
    ]
    for call, message in cases:
        with pytest.raises(PromptError, match=message):
            call()
    assert len(tiny.generate([m, m], adapters=[None, None], images=[[], []], max_new_tokens=2)) == 2


def test_eval_resumes_only_the_run_that_wrote_its_out(tmp_path, capsys, adapter_dir):  # noqa: F811
    from test_eval_data import b64, png, write_tsv

    from vlstack.cli import main

    rows = [{"index": str(i), "image": b64(png(i)), "question": f"Q{i}?", "answer": "7"} for i in range(3)]
    write_tsv(tmp_path / "b.tsv", rows)
    write_tsv(tmp_path / "c.tsv", rows[:2])
    out = tmp_path / "run"
    common = ["eval", "vqa", "--out", str(out), "--max-new-tokens", "2"]
    assert main([*common, "--data", str(tmp_path / "b.tsv"), "--limit", "2"]) == 0
    before = (out / "predictions.jsonl").read_text()
    capsys.readouterr()
    for other in (
        ["--data", str(tmp_path / "c.tsv")],
        ["--data", str(tmp_path / "b.tsv"), "--adapter", f"finance={adapter_dir}"],
        ["--data", str(tmp_path / "b.tsv"), "--metric", "anls"],
    ):
        assert main([*common, *other]) == 2
        assert "holds the predictions of another run" in capsys.readouterr().err
    eval_ = ["eval", "mmmu", "--out", str(out), "--data", str(tmp_path / "b.tsv")]
    assert main(eval_) == 2 and "benchmark, metric differ" in capsys.readouterr().err
    assert (out / "predictions.jsonl").read_text() == before  # nothing added to another run's file
    assert main([*common, "--data", str(tmp_path / "b.tsv")]) == 0  # the same run: resumed
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3
    (out / "run.json").unlink()  # predictions of unknown origin
    assert main([*common, "--data", str(tmp_path / "b.tsv")]) == 2 and "records no run.json" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["eval", "vqa", "--out", str(tmp_path / "file"), "--data", str(tmp_path / "b.tsv")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_compress_keeps_work_directories_it_did_not_make(tmp_path, capsys):
    from vlstack.cli import main

    data = write_dataset(tmp_path / "data", "d", 2, False)
    config = tmp_path / "c.yaml"
    config.write_text(
        f"stages:\n  - prune: {{mlp: 0.5, data: {data}, samples: 2}}\n"
        f"  - distill: {{data: {data}, steps: 1, batch_size: 1}}\n"
    )
    out = tmp_path / "small"
    theirs = [tmp_path / "small.distill", tmp_path / "small.distill.train"]
    for d in theirs:
        d.mkdir()
        (d / "mine.txt").write_text("the user's")
    assert main(["compress", "--config", str(config), "--output", str(out)]) == 2
    assert "small.distill exists and compress did not make it" in capsys.readouterr().err
    assert all((d / "mine.txt").read_text() == "the user's" for d in theirs) and not out.exists()
    # a compress without a distill stage leaves them alone too
    config.write_text("stages:\n  - quantize: {bits: 8}\n")
    assert main(["compress", "--config", str(config), "--output", str(out)]) == 0
    err = capsys.readouterr().err  # progress in every stage, and around each measurement
    assert "compress: stage 1/1: quantize\n" in err and "compress: stage 1/1: quantize done in" in err
    assert err.count("compress: measuring the") == 2
    assert all((d / "mine.txt").read_text() == "the user's" for d in theirs)


def test_outputs_follow_the_umask(tmp_path):
    from vlstack.files import new_directory, write_files

    old = os.umask(0o022)
    try:
        write_files(tmp_path / "a", {"f.txt": lambda p: p.write_text("x")})
        with new_directory(tmp_path / "b") as d:
            (d / "g.txt").write_text("y")
        assert (tmp_path / "a" / "f.txt").stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "b").stat().st_mode & 0o777 == 0o755
        os.umask(0o077)
        write_files(tmp_path / "a", {"h.txt": lambda p: p.write_text("x")})
        assert (tmp_path / "a" / "h.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_resume_loads_training_state_without_running_code(tmp_path):
    from vlstack.errors import ConfigError
    from vlstack.train.state import load_state, run_dir

    job = Job.of(
        "fin",
        write_dataset(tmp_path / "data", "fin", 2, False),
        tmp_path / "out" / "fin",
        rank=2,
        batch_size=1,
        steps=2,
        save_every=1,
    )
    train(vlstack.load("tiny", device="cpu"), [job], 2, verbose=False)
    assert load_state(job)["step"] == 2  # a checkpoint vlstack wrote loads

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    state = run_dir(job.output) / "checkpoint" / "state.pt"
    torch.save({"step": 1, "payload": Payload()}, state)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_state(job)
    assert not (tmp_path / "pwned").exists()


def test_tenants_share_no_cached_images_and_only_admins_see_shared_counters(tmp_path):
    import httpx
    from conftest import image
    from test_serve import data_url, running

    from vlstack.serve.app import create_app
    from vlstack.serve.auth import read_keys

    (tmp_path / "keys.yaml").write_text(
        "keys:\n  - {id: a, key: sk-a, models: [tiny]}\n"
        "  - {id: b, key: sk-b, models: [tiny]}\n"
        "  - {id: ops, key: sk-ops, models: ['*'], admin: true}\n"
    )
    app = create_app(vlstack.load("tiny", device="cpu"), "tiny", tenants=read_keys(tmp_path / "keys.yaml"))
    engine = app.state.engine
    page = [{"type": "image_url", "image_url": {"url": data_url(image(60, 40))}}, {"type": "text", "text": "?"}]
    body = {"model": "tiny", "messages": [{"role": "user", "content": page}], "max_tokens": 1}
    with running(app) as base:

        def send(key: str) -> None:
            r = httpx.post(base + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200

        send("sk-a")
        hits = engine.images.hits
        send("sk-b")  # the same image from another tenant: encoded again, no hit
        assert engine.images.hits == hits
        send("sk-a")  # its own image again: a hit
        assert engine.images.hits == hits + 1
        tenant = httpx.get(base + "/metrics", headers={"Authorization": "Bearer sk-b"}).text
        admin = httpx.get(base + "/metrics", headers={"Authorization": "Bearer sk-ops"}).text
    for shared in ("vlstack_http_requests_total", "vlstack_image_cache_hits_total", "vlstack_queue_depth"):
        assert shared not in tenant and shared in admin
    assert 'vlstack_requests_total{model="tiny"' in tenant  # its own model's series stay


def test_a_host_trickling_headers_meets_the_deadline_and_hosts_are_bounded(web, monkeypatch):  # noqa: F811
    import concurrent.futures
    import time

    from vlstack.errors import ImageError
    from vlstack.serve import openai as api_openai

    start = time.perf_counter()
    with pytest.raises(ImageError, match="took over 1 s"):
        api_openai.fetch_image(f"http://{web}/slow-headers", 1, allow_private=True)
    assert time.perf_counter() - start < 10  # its headers would take 50 s (a bound with room for a busy machine)
    monkeypatch.setattr(api_openai, "PER_HOST", 2)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        slow = [
            pool.submit(api_openai.fetch_image, f"http://{web}/slow-headers", 2, allow_private=True) for _ in range(2)
        ]
        while api_openai._in_flight["127.0.0.1"] < 2:  # (both under way, however busy the machine)
            time.sleep(0.01)
        with pytest.raises(ImageError, match="2 images are being fetched from 127.0.0.1 already"):
            api_openai.fetch_image(f"http://{web}/page.png", 2, allow_private=True)
        for f in slow:
            with pytest.raises(ImageError, match="took over 2 s"):
                f.result()
    assert api_openai.fetch_image(f"http://{web}/page.png", 2, allow_private=True)[:4] == b"\x89PNG"  # freed


def test_a_reply_cut_off_by_the_deadline_is_never_an_image(web, monkeypatch):  # noqa: F811
    """The deadline shuts the connection mid-headers, after which http.client may read a 200 with an empty body:
    the deadline's own flag decides (before: a clock read just after the timer started, so a fetch shut at the
    deadline could look faster than it and return b"" as the image). A clock frozen here makes that certain."""
    from vlstack.errors import ImageError
    from vlstack.serve import openai as api_openai

    monkeypatch.setattr(api_openai.time, "monotonic", lambda: 0.0)  # (threading's timer keeps its own clock)
    with pytest.raises(ImageError, match="took over 1 s"):
        api_openai.fetch_image(f"http://{web}/slow-headers", 1, allow_private=True)


@pytest.mark.slow
def test_serve_says_serving_once_bound_and_logs_a_line_per_request(tmp_path):
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.listen()  # the port in use: one line, before the model loads
        out = subprocess.run(
            [sys.executable, "-m", "vlstack.cli", "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    in_use = f"vlstack: error: cannot serve on 127.0.0.1:{port}: Address already in use\n"
    assert out.returncode == 2 and out.stderr == in_use
    assert "serving on" not in out.stdout
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlstack.cli", "serve", "--port", str(port)],
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        line = proc.stdout.readline()  # printed once bound: the server answers (or queues) from now on
        assert line.startswith("serving 'tiny'") and f":{port}/v1" in line
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base + "/health", timeout=60).status_code == 200
        body = {"model": "tiny", "messages": HI, "max_tokens": 2}
        r = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and httpx.get(base + "/v1/nope", timeout=60).status_code == 404
    finally:
        proc.terminate()
        err = proc.communicate(timeout=60)[1]
    lines = [x for x in err.splitlines() if x.startswith("127.0.0.1 ")]
    assert [x.split()[1:4] for x in lines] == [
        ["GET", "/health", "200"],
        ["POST", "/v1/chat/completions", "200"],
        ["GET", "/v1/nope", "404"],
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--port", "70000"], "--port 70000: a port is a number from 1 to 65535"),
        (["--port", "-1"], "a port is a number from 1 to 65535"),
        (["--image-cache-mb", "nan"], "image_cache_mb must be a finite number"),
        (["--max-body-mb", "nan"], "max_body_mb must be a finite number"),
        (["--adapter", "tiny=/tmp"], "the base model is served as 'tiny'; give the adapter another name"),
        (["--image-dir", "/no/such/dir"], "image_dir /no/such/dir is not a directory"),
        (["--adapter-dir", "/no/such/dir"], "adapter_dir /no/such/dir is not a directory"),
    ],
)
def test_serve_options_are_checked_before_the_model_loads(args, message, capsys):
    from vlstack.cli import main

    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


COMPRESS_OPTIONS = [
    ("- quantize: 8", "stage 1 (quantize) takes a mapping of options"),
    ("- quantize: {bits: '8'}", "quantize bits must be an integer (got '8')"),
    ("- quantize: {modules: '(['}", "quantize modules '([' is not a valid regex"),
    ("- quantize: {samples: -2}", "quantize samples must be >= 1"),
    ("- prune: {layers: true, data: DATA}", "prune layers must be an integer (got True)"),
    ("- prune: {mlp: true, data: DATA}", "prune mlp must be a finite number (got True)"),
    ("- prune: {samples: -1, data: DATA}", "prune samples must be >= 1"),
    ("- prune: {mlp: '0.5', data: DATA}", "prune mlp must be a finite number (got '0.5')"),
    ("- distill: {data: DATA, warmup_steps: -3, teacher: TEACHER}", "distill warmup_steps must be >= 0"),
    ("- distill: {data: DATA, temperature: .inf, teacher: TEACHER}", "distill temperature must be a finite number"),
    ("- distill: {data: DATA, steps: '5', teacher: TEACHER}", "distill steps must be an integer (got '5')"),
    ("- quantize: {bits: 8}\nreport: {limit: -1}", "report limit must be >= 1 (got -1)"),
    # the README's example settings on the tiny model: int4 groups of 128 over 192 channels left by the pruning
    (
        "- prune: {mlp: 0.5, heads: 0.5, hidden: 0.75, data: DATA}\n  - distill: {data: DATA, steps: 500}\n"
        "  - quantize: {bits: 4, group_size: 128}",
        "int4 group_size 128 does not divide the 192 inputs of language_model.layers.0.self_attn.q_proj after pruning",
    ),
]


@pytest.mark.parametrize("stages, message", COMPRESS_OPTIONS)
def test_compress_options_are_checked_before_any_work(tmp_path, capsys, stages, message):
    from vlstack.cli import main
    from vlstack.tiny import tiny_dir

    data = write_dataset(tmp_path, "d", 2, False)
    text = stages.replace("DATA", str(data)).replace("TEACHER", str(tiny_dir()))
    (tmp_path / "c.yaml").write_text("stages:\n  " + text + "\n")
    assert main(["compress", "--config", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "out.distill.train").exists()


@pytest.mark.parametrize(
    "field, message",
    [
        ("epochs: 1.0e30", "epochs must be in (0, 10000]"),
        ("warmup_steps: -3", "warmup_steps must be >= 0"),
        ("seed: 1180591620717411303424", "seed must be in [0, 2**63)"),
        ("output: .", "must name a directory of its own"),
        ("output: /proc/nope/x", "cannot write its output under /proc/nope"),
    ],
)
def test_job_fields_are_checked_before_training(tmp_path, capsys, field, message):
    from vlstack.cli import main

    write_dataset(tmp_path, "d", 2, False)
    job = {"name": "fin", "data": "d.jsonl", "output": "out/fin", "batch_size": 1, "steps": 1}
    key, value = field.split(": ")
    job = {k: v for k, v in job.items() if k != ("steps" if key == "epochs" else key)}
    lines = "".join(f"    {k}: {v}\n" for k, v in job.items())
    (tmp_path / "j.yaml").write_text(f"jobs:\n  - {key}: {value}\n{lines}")
    assert main(["train", str(tmp_path / "j.yaml")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_jobs_files_that_are_not_text_or_bad_max_rows_are_one_line(tmp_path, capsys):
    from vlstack.cli import main

    write_dataset(tmp_path, "d", 2, False)
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfejobs: []")
    (tmp_path / "rows.yaml").write_text("max_rows: true\njobs:\n  - {name: f, data: d.jsonl, output: o, steps: 1}\n")
    for name, message in (("bin.yaml", "not UTF-8 text"), ("rows.yaml", "max_rows must be an integer")):
        assert main(["train", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["plan", "--gpus", "2x0GB"], "a GPU's memory must be more than 0 GB"),
        (["plan", "--train-tokens", "-1"], "--train-tokens must be >= 1"),
        (["synth", "charts", "--size", "100000", "--out", "OUT"], "--size in [64, 4096]"),
        (["synth", "charts", "--n", "100000000000", "--out", "OUT"], "GiB of memory, more than the"),
        (["synth", "charts", "--n", "2", "--out", "/proc/x/y"], "cannot create /proc/x/y"),
    ],
)
def test_plan_and_synth_refuse_what_they_cannot_do(tmp_path, capsys, args, message):
    from vlstack.cli import main

    assert main([a.replace("OUT", str(tmp_path / "s")) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "s").exists()


def test_dataset_lines_that_json_cannot_hold_are_named(tmp_path):
    from vlstack.train.data import DatasetError, read_dataset

    def line(question: str, extra: str = "") -> str:
        turns = '[{"from": "human", "value": "' + question + '"}, {"from": "gpt", "value": "x"}]'
        return '{"conversations": ' + turns + extra + "}"

    cases = [
        (line("hi", ', "n": ' + "9" * 5000), "a number too long to read"),
        ('{"conversations": ' + "[" * 50_000 + "]" * 50_000 + "}", "nested too deeply"),
        (line("\\ud800"), "not valid Unicode"),
    ]
    for line, message in cases:
        (tmp_path / "d.jsonl").write_text(line + "\n")
        with pytest.raises(DatasetError, match=f"d.jsonl:1: .*{message}"):
            read_dataset(tmp_path / "d.jsonl")


def _rows(n: int = 2) -> list[dict]:
    from test_eval_data import b64, png

    return [{"index": str(i), "image": b64(png(i)), "question": f"Q{i}?", "answer": "7"} for i in range(n)]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"image": "[abc"}, r"b.tsv:2: column image: not valid JSON"),
        ({"image": "[1]"}, r"b.tsv:2: column image must be one value or a JSON list of strings"),
        ({"image_path": "[abc", "image": ""}, r"b.tsv:2: column image_path: not valid JSON"),
    ],
)
def test_bad_tsv_cells_are_named(tmp_path, change, message):
    from test_eval_data import write_tsv

    from vlstack.errors import DataError
    from vlstack.eval.benchmarks import read_items

    rows = _rows()
    rows[0] = {**rows[0], "image_path": "", **change}
    rows[1]["image_path"] = ""
    write_tsv(tmp_path / "b.tsv", rows)
    with pytest.raises(DataError, match=message):
        read_items(tmp_path / "b.tsv")


def test_bad_benchmark_files_are_one_line_errors(tmp_path):
    from test_eval_data import write_tsv

    from vlstack.errors import DataError
    from vlstack.eval.benchmarks import read_items

    write_tsv(tmp_path / "b.tsv", _rows())
    text = (tmp_path / "b.tsv").read_text().splitlines()
    (tmp_path / "short.tsv").write_text("\n".join([text[0], text[1].rsplit("\t", 1)[0], text[2]]) + "\n")
    (tmp_path / "bin.tsv").write_bytes(b"index\tquestion\n\xff\xfe\n")
    (tmp_path / "bin.jsonl").write_bytes(b'{"a": "\xff"}\n')
    line = {
        "image": "c.png",
        "answer": "7",
        "options": ["red", "blue"],
        "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "7"}],
    }
    (tmp_path / "c.png").write_bytes(__import__("test_eval_data").png(1))
    (tmp_path / "opts.jsonl").write_text(json.dumps(line) + "\n")
    (tmp_path / "one.jsonl").write_text(json.dumps({**line, "options": {}, "images": "c.png"}) + "\n")
    cases = [
        ("short.tsv", r"short.tsv:2: the row's cells do not match the header's 4 columns"),
        ("bin.tsv", "not UTF-8 text"),
        ("bin.jsonl", "not UTF-8 text"),
        ("opts.jsonl", r"opts.jsonl:1: options must be an object"),
    ]
    for name, message in cases:
        with pytest.raises(DataError, match=message):
            read_items(tmp_path / name)
    assert len(read_items(tmp_path / "one.jsonl")[0].images) == 1  # "images": "c.png" is one path


def test_a_truncated_image_names_its_item_and_can_be_scored_as_failed(tmp_path, capsys):
    import base64

    from test_eval_data import write_tsv

    from vlstack.cli import main

    rows = _rows(3)
    data = base64.b64decode(rows[1]["image"])
    rows[1]["image"] = base64.b64encode(data[: len(data) // 2]).decode()  # its header reads; its pixels do not
    write_tsv(tmp_path / "b.tsv", rows)
    common = ["eval", "vqa", "--data", str(tmp_path / "b.tsv"), "--max-new-tokens", "2"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "item 1: image 1 does not decode (could not decode image" in err and err.count("\n") == 1
    assert main([*common, "--out", str(tmp_path / "b"), "--skip-bad-images"]) == 0
    lines = {x["index"]: x for x in map(json.loads, (tmp_path / "b" / "predictions.jsonl").read_text().splitlines())}
    assert set(lines) == {"0", "1", "2"} and lines["1"]["score"] == 0.0 and "does not decode" in lines["1"]["error"]
    assert "error" not in lines["0"] and lines["0"]["completion_tokens"] > 0


def test_api_base_must_be_a_url():
    from vlstack.errors import EndpointError
    from vlstack.eval.remote import Endpoint

    with pytest.raises(EndpointError, match="'notaurl' is not an http"):
        Endpoint("notaurl", "m")


@pytest.mark.slow
def test_info_into_a_closed_pipe_and_help_lists_every_verb():
    import subprocess
    import sys

    from vlstack.cli import parser

    r, w = os.pipe()
    os.close(r)  # the reader is gone before anything is written (`vlstack info | head -0`)
    out = subprocess.run(
        [sys.executable, "-m", "vlstack.cli", "info"], stdout=w, stderr=subprocess.PIPE, text=True, timeout=120
    )
    os.close(w)
    assert out.returncode == 0 and out.stderr == ""
    text = parser().format_help()
    verbs = parser()._subparsers._group_actions[0].choices
    assert all(f"    {v} " in text and v in text.split("\n\n")[1] for v in verbs)


def test_image_errors_speak_vlstack(tmp_path):
    import io

    from PIL import Image

    from vlstack.errors import ImageError
    from vlstack.image import ImageLimits, load_image

    with pytest.raises(ImageError) as e:
        load_image(b"not an image at all")
    assert "BytesIO" not in str(e.value) and "not in an image format vlstack reads" in str(e.value)
    buf = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buf, format="PNG")  # 400 M pixels: over PIL's own bomb bound
    with pytest.raises(ImageError) as e:
        load_image(buf.getvalue(), ImageLimits(max_pixels=10**12))
    assert "over the limit of" in str(e.value) and "DOS" not in str(e.value)


def _margins_blank(path, margin: int = 3) -> bool:
    """Whether a picture's outer `margin` pixels are all white: nothing drawn ran off its edge."""
    from PIL import Image

    img = Image.open(path).convert("L")
    w, h = img.size
    for box in ((0, 0, margin, h), (w - margin, 0, w, h), (0, 0, w, margin), (0, h - margin, w, h)):
        if img.crop(box).getextrema()[0] < 250:
            return False
    return True


def test_plots_keep_their_labels_inside_the_picture(tmp_path):
    from types import SimpleNamespace

    from vlstack.eval.plot import bar_chart
    from vlstack.train.progress import plot_loss

    title = "chartqa (relaxed), /models/InternVL3-1B-hf-finance-and-legal-and-support+adapter: 91.5 over 1000 items"
    rows = [("all", 91.5, "n=1000, USD 0.1234 per 1,000 pages, 12.3 pages/s"), ("a category", 80.0, "")]
    assert _margins_blank(bar_chart(title, rows, tmp_path / "bars.png"))
    name = "a-job-name-of-sixty-four-characters-a-job-name-of-sixty-four-ch"
    run = SimpleNamespace(losses=[123456.789, 0.5, 0.25], job=SimpleNamespace(name=name, output=tmp_path / "out"))
    plot_loss(run)
    assert _margins_blank(tmp_path / "out.train" / "loss.png")


def test_the_readmes_openai_example_runs_as_written(server):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    readme = (root / "README.md").read_text()
    block = next(b.split("```", 1)[0] for b in readme.split("```python\n")[1:] if "from openai import OpenAI" in b)
    code = block.replace("http://127.0.0.1:8000/v1", server[0] + "/v1")  # (this test's server)
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and not out.stderr, out.stderr  # (the answer printed: random weights, any text)


@pytest.mark.parametrize("foreach", [False, True])
def test_a_non_finite_gradient_stops_the_job_at_its_step(tmp_path, monkeypatch, foreach):
    import vlstack.train.multi as multi
    import vlstack.train.running as running
    from vlstack.train import optim

    calls = []

    def poisoned(*args, **kwargs):  # the adapter's first weight gets an infinite gradient at the second step
        params = add_adapter(*args, **kwargs)
        params[0].register_hook(lambda g: g * float("inf") if len(calls.append(1) or calls) == 2 else g)
        return params

    add_adapter = running.add_adapter
    monkeypatch.setattr(running, "add_adapter", poisoned)
    step_jobs = optim.step_jobs
    monkeypatch.setattr(multi, "step_jobs", lambda *a, **k: step_jobs(*a, **k, foreach=foreach))
    job = Job.of(
        "fin",
        write_dataset(tmp_path / "data", "fin", 4, False),
        tmp_path / "out" / "fin",
        rank=2,
        batch_size=2,
        steps=4,
        save_every=1,
    )
    with pytest.raises(Diverged, match=r"job 'fin': the gradient is (inf|nan) at step 2:"):
        train(vlstack.load("tiny", device="cpu"), [job], 2, verbose=False)
    assert not job.output.exists()
    assert torch.load(job.output.with_name("fin.train") / "checkpoint" / "state.pt", weights_only=True)["step"] == 1
