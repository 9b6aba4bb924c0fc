"""Tensor parallelism: two gloo processes under torchrun give the logits and greedy tokens of one process, with a
mix of adapters (LLM and vision) and an adapter hot-loaded into a running engine, on each way the decoder packs
q/k/v (separate, stacked, grouped per KV head) and with fewer KV heads than ranks (replicated)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import rel_err, to_original_layout, write_hf_checkpoint
from test_lora import randomise_adapter

import vlstack
from vlstack.adapters import save_adapter
from vlstack.errors import ConfigError
from vlstack.layers.lora import LoRASpec, add_adapter

SHAPES = {  # name -> shape: one per q/k/v layout, and KV heads fewer than the ranks
    "qwen2": dict(tile=56, heads=4, kv_heads=2),
    "qwen2-kv1-untied": dict(tile=56, heads=4, kv_heads=1, tied=False),
    "phi3": dict(tile=56, text=dict(model_type="phi3", pad_token_id=0)),
    "internlm2": dict(tile=56, heads=4, kv_heads=1, tied=False, layers=2, text=dict(model_type="llama")),
}
VISION = LoRASpec(
    rank=4,
    alpha=8,
    targets=("q_proj", "v_proj", "fc1", "linear_1", "linear_2", "down_proj"),
    parts=("language", "vision", "projector"),
)


def write_adapter(base: Path, out: Path, spec: LoRASpec, seed: int) -> None:
    vlm = vlstack.load(base)
    randomise_adapter(add_adapter(vlm.model, "a", spec, seed=seed), seed=seed)
    save_adapter(vlm.model, "a", out, spec)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tp")
    for i, (name, shape) in enumerate(SHAPES.items()):
        d = root / name
        if name == "internlm2":  # the original layout, q/k/v packed per KV head
            write_hf_checkpoint(root / "llama", seed=i, **shape)
            to_original_layout(root / "llama", d / "base", internlm2=True)
        else:
            write_hf_checkpoint(d / "base", seed=i, **shape)
        write_adapter(d / "base", d / "text", LoRASpec(rank=4, alpha=8), seed=10 + i)
        write_adapter(d / "base", d / "vision", VISION, seed=20 + i)
        write_adapter(d / "base", d / "late", LoRASpec(rank=8, alpha=8, targets=("o_proj", "up_proj")), seed=30 + i)
    return root


def torchrun(*args: str, processes: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_tp2_equals_one_process(checkpoints, tmp_path):
    from tp_worker import run

    done = torchrun(str(Path(__file__).parent / "tp_worker.py"), str(checkpoints), "2", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    one = run(checkpoints, 1)
    assert set(one) == set(SHAPES)
    for name, want in one.items():
        for got in ranks:  # every rank gets every answer
            for key in ("mixed", "alone"):
                assert got[name][key].shape == want[key].shape
                assert rel_err(got[name][key], want[key]) <= 1e-5, (name, key)
            for key in ("greedy_staticFalse", "greedy_staticTrue", "greedy_late"):
                assert got[name][key] == want[key], (name, key)
        mixed = want["mixed"]
        assert rel_err(mixed[0], mixed[1]) > 1e-2 and rel_err(mixed[2], mixed[1]) > 1e-2  # (the adapters do act)
        assert rel_err(mixed, want["alone"]) <= 1e-5  # (stacked and per-segment LoRA agree)
        assert want["greedy_late"][0] != want["greedy_late"][2] or want["greedy_late"][1] != want["greedy_late"][2]


def two_nodes(*program: str) -> list[subprocess.Popen]:
    """`torchrun --nnodes 2 --node-rank R --master-addr ... PROGRAM` for R = 0, 1: two local processes as the two
    machines, one rank each."""
    from vlstack.parallel.serving import free_port

    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
    ]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    return [subprocess.Popen([*launcher, "--node-rank", str(r), *program], **pipes) for r in range(2)]


def run_two_nodes(*program: str, timeout: float = 150, attempts: int = 2) -> None:
    """two_nodes(PROGRAM) run to their end. Once in a few full-suite runs the pair hung (on its rendezvous, the
    suspect; it passes alone in ~16 s): then both are killed, their stderr shown as a warning, and the pair is
    started again on a new port."""
    for attempt in range(attempts):
        nodes = two_nodes(*program)
        try:
            errs = [node.communicate(timeout=timeout)[1] for node in nodes]
        except subprocess.TimeoutExpired:
            for node in nodes:
                _kill_tree(node.pid)
            tails = [node.communicate()[1][-1500:] for node in nodes]
            if attempt + 1 == attempts:
                raise AssertionError(f"two torchrun nodes hung {attempts} times; their stderr: {tails}") from None
            warnings.warn(f"two torchrun nodes hung (try {attempt + 1}), started again; stderr: {tails}", stacklevel=2)
            continue
        for node, err in zip(nodes, errs):
            assert node.returncode == 0, err[-3000:]
        return


@pytest.mark.slow
def test_two_nodes_under_torchrun(checkpoints, tmp_path):
    """Multi-node as a user starts it (`torchrun --nnodes 2 --node-rank R --master-addr ...`), two local processes
    as the two nodes, one rank each: the same answers as one process."""
    from tp_worker import run

    root = tmp_path / "one"
    root.mkdir()
    (root / "qwen2-kv1-untied").symlink_to(checkpoints / "qwen2-kv1-untied")
    run_two_nodes(str(Path(__file__).parent / "tp_worker.py"), str(root), "2", str(tmp_path))
    want = run(root, 1)["qwen2-kv1-untied"]
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")["qwen2-kv1-untied"]
        assert rel_err(got["mixed"], want["mixed"]) <= 1e-5
        assert got["greedy_staticTrue"] == want["greedy_staticTrue"] and got["greedy_late"] == want["greedy_late"]


def test_tp_needs_its_processes_and_a_divisible_model(checkpoints):
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node 2"):
        vlstack.load(checkpoints / "qwen2" / "base", tp=2)
    with pytest.raises(ConfigError, match="tp must be 1 or more"):
        vlstack.load(checkpoints / "qwen2" / "base", tp=0)
    from vlstack.models.config_json import read_config
    from vlstack.parallel.tp import TP, heads

    t = read_config(checkpoints / "qwen2" / "base").text  # 4 heads, 2 KV heads
    assert heads(t, TP(1, 2)) == ([2, 3], [1])
    assert heads(t, TP(3, 4)) == ([3], [1])  # KV heads replicated: the one its query head reads
    with pytest.raises(ConfigError, match="does not divide the 4 attention heads"):
        heads(t, TP(0, 3))


def _children(pid: int) -> list[int]:
    """The processes whose parent is pid (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
def test_serve_tp2_answers_as_one_process_and_stops_when_a_rank_dies(checkpoints, tmp_path):
    """`vlstack serve --tp 2`: ready once warmed up; greedy answers with a mix of adapters (LLM and vision) and a
    hot-loaded one equal one process's; then a rank killed makes the other ranks and the server exit, naming
    it, instead of hanging."""
    import concurrent.futures
    import time

    import httpx
    from conftest import image
    from test_serve import data_url

    from vlstack.parallel.serving import free_port

    d = checkpoints / "qwen2"
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vlstack.cli",
        "serve",
        "--tp",
        "2",
        "--model",
        str(d / "base"),
        "--port",
        str(port),
        "--adapter",
        f"text={d / 'text'}",
        "--adapter",
        f"vision={d / 'vision'}",
        "--adapter-dir",
        str(d),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, ready = time.time() + 120, None
        while time.time() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(base + "/health/ready", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        assert ready is not None and ready.status_code == 200, proc.stderr.read() if proc.poll() is not None else ""
        assert ready.json()["tp"] == 2
        pic = image(90, 60, seed=5)
        content = [{"type": "image_url", "image_url": {"url": data_url(pic)}}, {"type": "text", "text": "Describe."}]
        loaded = httpx.post(base + "/v1/adapters", json={"name": "late", "path": "late"}, timeout=60)
        assert loaded.status_code == 200, loaded.text
        models = ["text", "base", "vision", "late"]

        def ask(model: str) -> str:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": 6,
                "temperature": 0,
            }
            r = httpx.post(base + "/v1/chat/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # at once: one batch mixing the adapters
            got = list(pool.map(ask, models))
        vlm = vlstack.load(d / "base")
        for name in ("text", "vision", "late"):
            vlm.load_adapter(name, d / name)
        want = [vlm.chat("Describe.", images=pic, adapter=None if m == "base" else m, max_new_tokens=6) for m in models]
        assert got == want and len(set(got)) > 1  # (the adapters do change the answers)
        assert httpx.delete(base + "/v1/adapters/late", timeout=60).status_code == 200  # unloaded on every rank
        assert ask("text") == want[0] and ask("vision") == want[2]  # (by the engine's next step: the ranks agree)

        ranks = _children(proc.pid)
        assert len(ranks) == 2
        worker = next(p for p in ranks if b"RANK=1\0" in Path(f"/proc/{p}/environ").read_bytes())
        os.kill(worker, signal.SIGKILL)
        code = proc.wait(timeout=60)
        assert code != 0
        assert "rank 1 exited" in proc.stderr.read()
        assert not [p for p in ranks if Path(f"/proc/{p}").exists() and "zombie" not in _state(p)]
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
            proc.wait()


@pytest.mark.slow
def test_serve_under_torchrun_on_two_nodes(checkpoints):
    """`torchrun --nnodes 2 ... -m vlstack.cli serve --tp 2` (two local processes as the two machines): rank 0
    serves, ready, answering as one process; stopping it stops the other node."""
    import time

    import httpx

    from vlstack.parallel.serving import free_port

    d = checkpoints / "phi3"
    port = free_port()
    nodes = two_nodes(
        "-m",
        "vlstack.cli",
        "serve",
        "--tp",
        "2",
        "--model",
        str(d / "base"),
        "--port",
        str(port),
        "--adapter",
        f"text={d / 'text'}",
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, status = time.time() + 120, None
        while time.time() < deadline and all(n.poll() is None for n in nodes) and status != 200:
            try:
                status = httpx.get(base + "/health/ready", timeout=2).status_code
            except httpx.HTTPError:
                time.sleep(0.3)
        assert status == 200, [n.stderr.read()[-2000:] for n in nodes if n.poll() is not None]
        body = {
            "model": "text",
            "messages": [{"role": "user", "content": "Describe the chart."}],
            "max_tokens": 6,
            "temperature": 0,
        }
        got = httpx.post(base + "/v1/chat/completions", json=body, timeout=120).json()["choices"][0]["message"]
        vlm = vlstack.load(d / "base")
        vlm.load_adapter("text", d / "text")
        assert got["content"] == vlm.chat("Describe the chart.", adapter="text", max_new_tokens=6)
        nodes[0].terminate()
        assert nodes[1].wait(timeout=60) is not None
    finally:
        for n in nodes:
            if n.poll() is None:
                _kill_tree(n.pid)
                n.wait()


def _kill_tree(pid: int) -> None:
    """SIGKILL pid and every process under it (torchrun's workers hold its pipes; some start their own session)."""
    todo, tree = [pid], []
    while todo:
        tree.append(todo.pop())
        todo += _children(tree[-1])
    for p in reversed(tree):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"
