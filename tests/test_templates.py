"""The original checkpoints' chat templates render exactly what InternVL's conversation.py renders: the expected
strings below are written out by hand from its rules (MPT style: system prompt + sep, then role + message + sep
for each turn, the generation prompt the assistant role alone)."""

from __future__ import annotations

import json

import pytest
from conftest import to_original_layout, write_hf_checkpoint

import vlstack
from vlstack.chat import Processor, read_template, read_tokenizer
from vlstack.errors import ConfigError
from vlstack.models.config_json import read_config
from vlstack.tiny import ASSETS

OLD = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
NEW = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
TURNS = [
    {"role": "user", "content": "Image-1: <image>\nImage-2: <image>\nWhich chart is taller?"},
    {"role": "assistant", "content": "The first."},
    {"role": "user", "content": "By how much?"},
]
Q1, A1, Q2 = "Image-1: <image>\nImage-2: <image>\nWhich chart is taller?", "The first.", "By how much?"
EXPECTED = {
    "internlm2-chat": f"<|im_start|>system\n{OLD}<|im_end|><|im_start|>user\n{Q1}<|im_end|><|im_start|>assistant\n"
    f"{A1}<|im_end|><|im_start|>user\n{Q2}<|im_end|><|im_start|>assistant\n",
    "Hermes-2": f"<|im_start|>system\n{OLD}<|im_end|><|im_start|>user\n{Q1}<|im_end|><|im_start|>assistant\n"
    f"{A1}<|im_end|><|im_start|>user\n{Q2}<|im_end|><|im_start|>assistant\n",
    "internvl2_5": f"<|im_start|>system\n{NEW}<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n"
    f"{A1}<|im_end|>\n<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n",
    "phi3-chat": f"<|system|>\n{OLD}<|end|><|user|>\n{Q1}<|end|><|assistant|>\n{A1}<|end|><|user|>\n{Q2}<|end|>"
    "<|assistant|>\n",
}


def processor(template: str) -> Processor:
    return Processor(read_tokenizer(ASSETS), read_config(ASSETS), read_template(ASSETS, template))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_templates_render_as_conversation_py(name):
    p = processor(name)
    text, _ = p.render(TURNS)
    assert p.unmark(text) == EXPECTED[name]
    own = [{"role": "system", "content": "Be brief."}, *TURNS]  # a system message of its own replaces the default
    text, _ = p.render(own)
    want = EXPECTED[name].replace(NEW if name == "internvl2_5" else OLD, "Be brief.")
    assert p.unmark(text) == want
    text, _ = p.render(TURNS[:2], add_generation_prompt=False)  # a finished conversation (training) ends on sep
    role = "<|user|>\n" if name == "phi3-chat" else "<|im_start|>user\n"
    assert p.unmark(text) == EXPECTED[name][: EXPECTED[name].index(role + Q2)]


def test_original_checkpoint_chats_with_its_template(tmp_path):
    write_hf_checkpoint(tmp_path / "hf", tile=56)
    to_original_layout(tmp_path / "hf", tmp_path / "orig")
    cfg = json.loads((tmp_path / "orig" / "config.json").read_text())
    cfg["template"] = "internlm2-chat"
    (tmp_path / "orig" / "config.json").write_text(json.dumps(cfg))
    vlm = vlstack.load(tmp_path / "orig")
    text, _ = vlm.processor.render([{"role": "user", "content": "Hi"}])
    assert vlm.processor.unmark(text) == f"<|im_start|>system\n{OLD}<|im_end|><|im_start|>user\nHi<|im_end|>" + (
        "<|im_start|>assistant\n"
    )
    assert vlm.processor.token_id("<|im_end|>") in vlm.eos
    native = vlstack.load(tmp_path / "hf")  # the -hf layout keeps its own jinja template: no default system message
    text, _ = native.processor.render([{"role": "user", "content": "Hi"}])
    assert not native.processor.unmark(text).startswith("<|im_start|>system")
    cfg["template"] = "vicuna_v1.1"
    (tmp_path / "orig" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="template 'vicuna_v1.1'.*internlm2-chat"):
        vlstack.load(tmp_path / "orig")
