"""Weight-only quantisation (compress/quantize.py): integers within their rounding bound, the quantised layer equal
to x @ dequant(W).T, adapters on a quantised base equal to the same adapters on the dequantised base, quantised
checkpoints that load and serve; bad input named before any work."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import image, rel_err
from test_lora import randomise_adapter
from torch import nn

import vlstack
from vlstack.chat import question_messages
from vlstack.compress import compress, read_stages
from vlstack.compress.quantize import awq_scale, quantize_model
from vlstack.errors import ConfigError
from vlstack.layers.lora import LoRASpec, add_adapter
from vlstack.layers.quant import QuantConfig, QuantLinear, dequantize, quantize_weight


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 16), (4, 64)])
def test_dequantised_weights_are_within_the_rounding_bound(bits, group):
    w = torch.randn(48, 128) * torch.linspace(0.1, 3, 48)[:, None]  # channels of different ranges
    w[5] = 0  # an all-zero row: no division by zero
    cfg = QuantConfig(bits=bits, group_size=group or 128)
    t = quantize_weight(w, cfg)
    back = dequantize(t, bits, cfg.group_size)
    if bits == 8:
        assert t["qweight"].dtype == torch.int8 and t["qweight"].shape == (48, 128)
        bound = t["scales"][:, None] / 2  # half a step of its channel
    else:
        assert t["qweight"].dtype == torch.uint8 and t["qweight"].shape == (48, 64)  # two a byte
        bound = t["scales"].repeat_interleave(group, dim=1) / 2 * (1 + 1e-5)  # half a step of its group
    assert ((back - w).abs() <= bound + 1e-7).all()
    assert torch.equal(back[5], torch.zeros(128))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_linear_is_x_times_the_dequantised_weight(bits):
    lin = nn.Linear(64, 40)
    q = QuantLinear.of(lin, QuantConfig(bits=bits, group_size=32))
    x = torch.randn(7, 64)
    assert torch.equal(q(x), x @ q.dequantized().T + lin.bias)
    assert not hasattr(q, "weight") or not isinstance(q.weight, torch.Tensor)  # no float weight is kept


def test_the_int8_kernels_agree_with_the_reference():
    """The CUDA path's int8 matmul (run here on the CPU) and the CPU's fast kernels (int8 W8A8, int4 with bfloat16
    activations) stay near the reference."""
    lin = nn.Linear(256, 96)
    q = QuantLinear.of(lin, QuantConfig(bits=8))
    x = torch.randn(5, 256)
    ref = q(x)
    mm = torch._weight_int8pack_mm(x, q.qweight, q.scales) + q.bias
    assert rel_err(mm, ref) < 1e-5
    dyn = QuantLinear.of(lin, QuantConfig(bits=8, kernel="fast"))
    assert rel_err(dyn(x), ref) < 0.02  # activations rounded to int8 per token
    four = QuantLinear.of(lin, QuantConfig(bits=4, group_size=64))
    fast = QuantLinear.of(lin, QuantConfig(bits=4, group_size=64, kernel="fast"))
    assert torch.equal(fast.qweight, four.qweight)
    assert rel_err(fast(x), four(x)) < 1e-2  # bfloat16 activations


@pytest.mark.parametrize("bits", [8, 4])
def test_an_adapter_on_a_quantised_base_equals_it_on_the_dequantised_base(bits):
    quantised = vlstack.load("tiny", device="cpu")
    names = quantize_model(quantised.model, QuantConfig(bits=bits, group_size=64))
    assert len(names) == 4 * 7 and all(n.startswith("language_model.layers.") for n in names)
    dense = vlstack.load("tiny", device="cpu")
    with torch.no_grad():
        for name in names:
            dense.model.get_submodule(name).weight.copy_(quantised.model.get_submodule(name).dequantized())
    spec = LoRASpec(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj", "fc1"), parts=("language", "vision"))
    for vlm in (quantised, dense):
        randomise_adapter(add_adapter(vlm.model, "a", spec, seed=1), seed=2)
    x = quantised.processor(question_messages("What is it?", 1), [image(60, 60)])
    ours = quantised(x["input_ids"], x["pixel_values"], adapter="a")
    assert rel_err(ours, dense(x["input_ids"], x["pixel_values"], adapter="a")) < 1e-5
    assert rel_err(ours, quantised(x["input_ids"], x["pixel_values"])) > 1e-3  # the adapter acts
    tokens = quantised.generate([question_messages("What is it?", 0)], adapters=["a"], max_new_tokens=5)
    assert tokens == dense.generate([question_messages("What is it?", 0)], adapters=["a"], max_new_tokens=5)


def test_a_quantised_checkpoint_saves_loads_and_serves(tmp_path):
    (tmp_path / "q.yaml").write_text("stages:\n  - quantize: {bits: 4, group_size: 64}\n")
    vlm = vlstack.load("tiny", device="cpu")
    x = vlm.processor(question_messages("What is it?", 1), [image(60, 60)])
    out = compress(vlm, read_stages(tmp_path / "q.yaml"), tmp_path / "out")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "vlstack" and config["bits"] == 4 and config["group_size"] == 64
    assert set(config["full_precision"]) == {"vision_tower", "multi_modal_projector", "lm_head"}
    back = vlstack.load(out, device="cpu")
    assert isinstance(back.model.language_model.layers[0].mlp.down_proj, QuantLinear)
    assert type(back.model.vision_tower.encoder.layer[0].mlp.fc1) is nn.Linear
    assert torch.equal(back(x["input_ids"], x["pixel_values"]), vlm(x["input_ids"], x["pixel_values"]))
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    full = sum(f.stat().st_size for f in vlstack.tiny.tiny_dir().glob("*.safetensors"))
    assert size < 0.6 * full  # the LLM's layers at 4 bits (the embeddings and vision tower stay float32)


def test_bad_compress_configs_are_named_before_any_work(tmp_path):
    cases = {
        "stages:\n  - shrink: {}\n": "unknown stage 'shrink'",
        "stages:\n  - quantize: {bits: 3}\n": "bits must be 4 or 8",
        "stages:\n  - quantize: {bits: 4, group_size: 48, kernel: fast}\n": "fast int4 kernel takes group_size",
        "stages:\n  - quantize: {bitz: 4}\n": "unknown options \\['bitz'\\]",
        "stages: []\n": "expected 'stages:'",
    }
    for i, (text, message) in enumerate(cases.items()):
        (tmp_path / f"{i}.yaml").write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_stages(tmp_path / f"{i}.yaml")
    vlm = vlstack.load("tiny", device="cpu")
    with pytest.raises(ConfigError, match="group_size 96 does not divide"):
        quantize_model(vlm.model, QuantConfig(bits=4, group_size=96))
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError, match="exists"):
        compress(vlm, [("quantize", QuantConfig())], tmp_path / "out")
    import vlstack.layers.quant as quantize

    real = quantize.cpu_engines
    quantize.cpu_engines = lambda: ["qnnpack"]  # a CPU without fbgemm (an ARM machine)
    try:
        with pytest.raises(ConfigError, match="fast int8 kernel on a CPU needs PyTorch's fbgemm"):
            compress(vlm, [("quantize", QuantConfig(kernel="fast"))], tmp_path / "new")
    finally:
        quantize.cpu_engines = real
    assert not (tmp_path / "new").exists()


def test_merging_into_a_quantised_base_is_refused():
    from vlstack.adapters import merge_adapter

    vlm = vlstack.load("tiny", device="cpu")
    quantize_model(vlm.model, QuantConfig())
    add_adapter(vlm.model, "a", LoRASpec(rank=2))
    with pytest.raises(ConfigError, match="quantised"):
        merge_adapter(vlm.model, "a")


def test_qlora_training_on_a_quantised_base(tmp_path):
    """A new adapter trained over a quantised frozen base (QLoRA) ends as it does over the dequantised base."""
    from test_train import assert_same_adapter, write_dataset

    from vlstack.train.jobs import Job
    from vlstack.train.multi import train

    quantised = vlstack.load("tiny", device="cpu")
    names = quantize_model(quantised.model, QuantConfig(bits=4, group_size=64))
    dense = vlstack.load("tiny", device="cpu")
    with torch.no_grad():
        for name in names:
            dense.model.get_submodule(name).weight.copy_(quantised.model.get_submodule(name).dequantized())
    data = write_dataset(tmp_path / "data", "a", 4, False)
    for label, vlm in (("q", quantised), ("d", dense)):
        job = Job.of("a", data, tmp_path / label, rank=4, alpha=8, batch_size=2, steps=3, lr=2e-2)
        train(vlm, [job], max_rows=2, verbose=False)
    from safetensors.torch import load_file

    trained = load_file(tmp_path / "q" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and t.abs().max() > 0 for k, t in trained.items())  # it learned
    assert_same_adapter(trained, load_file(tmp_path / "d" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_cli_compress_then_chat(tmp_path):
    from conftest import run_cli

    (tmp_path / "q.yaml").write_text("stages:\n  - quantize: {bits: 8, kernel: fast}\n")
    done = run_cli("compress", "--config", str(tmp_path / "q.yaml"), "--output", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    chat = run_cli("chat", "--model", str(tmp_path / "out"), "--max-new-tokens", "3", "Hello?")
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
    again = run_cli("compress", "--config", str(tmp_path / "q.yaml"), "--output", str(tmp_path / "out"))
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr


def test_the_vision_tower_is_quantised_only_when_asked():
    vlm = vlstack.load("tiny", device="cpu")
    names = quantize_model(vlm.model, QuantConfig(bits=8, modules=".*", full_precision=("lm_head",)))
    assert any(n.startswith("vision_tower.") for n in names) and "multi_modal_projector.linear_1" in names
    assert "lm_head" not in names and type(vlm.model.lm_head) is nn.Linear


def test_compress_reports_each_stage(tmp_path):
    """compress.md/.json/.png: bytes, parameters, decode speed and the score on an eval set, after the input and
    after each stage."""
    from vlstack.compress import read_report
    from vlstack.synth import synthesize

    synthesize("charts", 10, tmp_path / "charts", size=224, questions="visual")
    data = tmp_path / "charts" / "test.jsonl"
    (tmp_path / "q.yaml").write_text(
        json.dumps(
            {
                "stages": [{"quantize": {"bits": 4, "group_size": 64}}],
                "report": {"benchmark": "chartqa", "data": str(data), "limit": 6, "new_tokens": 4},
            }
        )
    )
    vlm = vlstack.load("tiny", device="cpu")
    out = compress(vlm, read_stages(tmp_path / "q.yaml"), tmp_path / "out", report=read_report(tmp_path / "q.yaml"))
    rows = json.loads((out / "compress.json").read_text())
    assert [r["stage"] for r in rows] == ["input", "quantize"]
    assert rows[1]["bytes"] < rows[0]["bytes"] and rows[1]["parameters"] == rows[0]["parameters"]
    assert all(r["decode_tok_s"] > 0 and 0 <= r["score"] <= 100 for r in rows)
    assert "| quantize |" in (out / "compress.md").read_text() and (out / "compress.png").stat().st_size > 0
    (tmp_path / "bad.yaml").write_text(json.dumps({"stages": [{"quantize": {}}], "report": {"data": "nope.jsonl"}}))
    with pytest.raises(ConfigError, match="report data nope.jsonl is not a file"):
        read_report(tmp_path / "bad.yaml")


def test_awq_scaling_lowers_the_error_where_activations_have_outliers():
    """A layer whose inputs carry a few large channels: activation-aware scaling quantises it nearer the float
    layer on those inputs than plain int4, and the layer is still x @ dequant(W).T (the scale folded in)."""
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=False)
    x = torch.randn(256, 128)
    x[:, :4] *= 30  # outlier channels
    plain = QuantLinear.of(lin, QuantConfig(bits=4, group_size=32))
    awq = QuantConfig(bits=4, group_size=32, awq=True, data=__file__)
    scaled = QuantLinear.of(lin, awq, awq_scale(lin.weight, x, awq))
    want = lin(x)
    err = {name: (q(x) - want).pow(2).mean().item() for name, q in (("plain", plain), ("awq", scaled))}
    assert err["awq"] < 0.8 * err["plain"], err
    torch.testing.assert_close(scaled(x), x @ scaled.dequantized().T, rtol=1e-5, atol=1e-5)
    s = awq_scale(lin.weight, x, QuantConfig(bits=4, group_size=32))
    assert s[:4].min() > s[4:].max()  # the outlier channels are scaled up (finer steps for them)
    fast_awq = QuantConfig(bits=4, group_size=32, awq=True, data=__file__, kernel="fast")
    fast = QuantLinear.of(lin, fast_awq, awq_scale(lin.weight, x, fast_awq))
    assert rel_err(fast(x), scaled(x)) < 1e-2


def test_awq_checkpoints_save_and_load(tmp_path):
    from test_train import write_dataset

    data = write_dataset(tmp_path / "data", "c", 3, True)
    stage = {"bits": 4, "group_size": 64, "awq": True, "data": str(data), "samples": 3}
    (tmp_path / "q.yaml").write_text(json.dumps({"stages": [{"quantize": stage}]}))
    vlm = vlstack.load("tiny", device="cpu")
    x = vlm.processor(question_messages("What is it?", 1), [image(60, 60)])
    out = compress(vlm, read_stages(tmp_path / "q.yaml"), tmp_path / "out")
    back = vlstack.load(out, device="cpu")
    assert back.model.language_model.layers[0].mlp.down_proj.input_scale.shape == (512,)
    assert torch.equal(back(x["input_ids"], x["pixel_values"]), vlm(x["input_ids"], x["pixel_values"]))
    (tmp_path / "bad.yaml").write_text(json.dumps({"stages": [{"quantize": {"bits": 4, "awq": True}}]}))
    with pytest.raises(ConfigError, match="awq needs calibration data"):
        read_stages(tmp_path / "bad.yaml")
