"""SentencePiece tokenizer.model files (the InternLM2-based releases' tokenizers) read as sentencepiece itself
encodes: models trained here by sentencepiece, BPE and unigram, with byte fallback, user-defined symbols and
added tokens beyond the model's pieces."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from conftest import image

import vlstack
from vlstack.chat import question_messages
from vlstack.errors import ConfigError
from vlstack.spm import convert

WORDS = (
    "the chart shows sales by region revenue quarter invoice total amount date name north south east west 2024 "
    "12.5% café naïve 图表 数据 Ｆｕｌｌ ①"
).split()
TEXTS = [
    "Hello  world\n the chart 😀 x",
    "the invoice total amount",
    "  leading and trailing  ",
    "",
    "a",
    "café naïve 图表数据",
    "Ｆｕｌｌ width ① 12.5%",
    "tab\there\n\nnew",
    "sales-by-region:north/south",
]
ADDED = ["<img>", "</img>", "<IMG_CONTEXT>"]


def train(directory, kind: str):
    """A tiny tokenizer.model trained by sentencepiece (<|im_start|>, <|im_end|> user-defined, as InternLM2's are),
    InternVL's image tokens in added_tokens.json after its pieces; -> sentencepiece's own processor."""
    import sentencepiece as sp

    rng = random.Random(0)
    corpus = directory / "corpus.txt"
    directory.mkdir(parents=True, exist_ok=True)
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(3000)))
    sp.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(directory / "tokenizer"),
        model_type=kind,
        byte_fallback=True,
        vocab_size=400 if kind == "bpe" else 320,
        minloglevel=2,
        character_coverage=0.9995,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
    )
    corpus.unlink()
    (directory / "tokenizer.vocab").unlink()
    proc = sp.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    n = proc.get_piece_size()
    (directory / "added_tokens.json").write_text(json.dumps({t: n + i for i, t in enumerate(ADDED)}))
    (directory / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "<s>"}))
    return proc


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_ids_equal_sentencepieces(tmp_path, kind):
    proc = train(tmp_path, kind)
    tok = convert(tmp_path)
    rng = random.Random(1)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 14))) for _ in range(300)]
    for text in TEXTS + lines:
        assert tok.encode(text, add_special_tokens=False).ids == proc.encode(text), text
    n = proc.get_piece_size()
    assert [tok.token_to_id(t) for t in ADDED] == [n, n + 1, n + 2]
    # added tokens split out first, each run between them encoded on its own; BOS in front
    text = "<img><IMG_CONTEXT></img>the chart<|im_end|> total"
    want = [
        proc.bos_id(),
        n,
        n + 2,
        n + 1,
        *proc.encode("the chart"),
        proc.piece_to_id("<|im_end|>"),
        *proc.encode(" total"),
    ]
    assert tok.encode(text).ids == want
    ids = proc.encode("the chart café 😀 图表")
    assert tok.decode(ids) == proc.decode(ids)


def test_a_checkpoint_with_only_a_tokenizer_model_loads(tmp_path):
    """The original layout with a SentencePiece tokenizer (as InternVL2-8B ships): BOS first, the image tokens at
    their ids, the text as sentencepiece encodes it; it generates."""
    from vlstack.tiny import tiny_dir

    shutil.copytree(tiny_dir(), tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.json"):
        (tmp_path / "m" / name).unlink(missing_ok=True)
    proc = train(tmp_path / "m", "bpe")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["image_token_id"] = proc.get_piece_size() + 2  # (a checkpoint's config agrees with its tokenizer)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    vlm = vlstack.load(tmp_path / "m")
    ids = vlm.processor(question_messages("the chart", 1), [image(60, 60)])["input_ids"][0].tolist()
    n = proc.get_piece_size()
    context = ids.count(n + 2)
    assert context == vlm.cfg.tokens_per_tile and ids[0] == proc.bos_id()
    start = [proc.piece_to_id("<|im_start|>")] + proc.encode("user\n")
    assert ids[1 : 1 + len(start)] == start and ids[1 + len(start)] == n  # <img> after "user\n"
    assert ids[1 + len(start) + 1 + context] == n + 1
    logits = vlm(torch.tensor([ids]), vlm.processor(question_messages("the chart", 1), [image(60, 60)])["pixel_values"])
    assert logits.shape == (1, len(ids), vlm.cfg.text.vocab_size)
    assert isinstance(vlm.chat("the chart", image(60, 60), max_new_tokens=4), str)


def test_a_broken_tokenizer_model_is_named(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\xff\xff\xff")
    with pytest.raises(ConfigError, match="is not a SentencePiece model"):
        convert(tmp_path)
