"""SentencePiece `tokenizer.model` files (the InternLM2-based releases ship one, often without a tokenizer.json),
converted at load into a `tokenizers` Tokenizer that encodes as SentencePiece does, so the rest of vlstack reads
every checkpoint's tokenizer the same way.

The model file is a protobuf (sentencepiece_model.proto), read here directly: its pieces (text, score, type),
the model type (BPE or unigram, with byte fallback) and the normalizer (the precompiled character map, extra
whitespace removed, the dummy prefix, spaces escaped as "▁"). A BPE model's merges follow from its pieces: a piece
is the merge of two others, ranked by its own score, as SentencePiece's BPE applies them. Added tokens (the
checkpoint's added_tokens.json and tokenizer_config.json: `<img>`, `<IMG_CONTEXT>`, `<|im_end|>`...) are split out
before the rest of the text is encoded, each run encoded as SentencePiece encodes a string of its own; BOS is
prepended where tokenizer_config.json says `add_bos_token` (its default: true).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors

from .errors import ConfigError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """A protobuf message -> [(field number, value)]: varints as ints, length-delimited as bytes, fixed32 as raw
    bytes (a float's)."""
    out, i = [], 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            n, i = _varint(data, i)
            value, i = data[i : i + n], i + n
        elif wire == 5:
            value, i = data[i : i + 4], i + 4
        elif wire == 1:
            value, i = data[i : i + 8], i + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.append((number, value))
    return out


def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = data[i]
        result |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return result, i
        shift += 7


def read_model(path: Path) -> dict:
    """tokenizer.model -> {pieces: [(text, score, type)], model_type, byte_fallback, charsmap, add_dummy_prefix,
    remove_extra_whitespaces, escape_whitespaces}."""
    try:
        top = _fields(path.read_bytes())
        pieces = []
        spec = {
            "model_type": UNIGRAM,
            "byte_fallback": False,
            "charsmap": b"",
            "add_dummy_prefix": True,
            "remove_extra_whitespaces": True,
            "escape_whitespaces": True,
        }  # fmt: skip (proto defaults)
        for number, value in top:
            if number == 1:  # SentencePiece
                f = dict(_fields(value))
                score = struct.unpack("<f", f[2])[0] if 2 in f else 0.0
                pieces.append((f.get(1, b"").decode("utf-8"), score, f.get(3, NORMAL)))
            elif number == 2:  # TrainerSpec
                for n, v in _fields(value):
                    if n == 3:
                        spec["model_type"] = v
                    elif n == 35:
                        spec["byte_fallback"] = bool(v)
            elif number == 3:  # NormalizerSpec
                names = {2: "charsmap", 3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}
                for n, v in _fields(value):
                    if n in names:
                        spec[names[n]] = v if n == 2 else bool(v)
    except (ValueError, IndexError, UnicodeDecodeError, struct.error) as e:
        raise ConfigError(f"{path} is not a SentencePiece model: {e}") from None
    if not pieces:
        raise ConfigError(f"{path} is not a SentencePiece model: it has no pieces")
    if spec["model_type"] not in (UNIGRAM, BPE):
        raise ConfigError(f"{path}: SentencePiece model type {spec['model_type']} is not supported (BPE or unigram)")
    return {"pieces": pieces, **spec}


def _merges(pieces: list[tuple[str, float, int]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """A BPE model's merges: each normal piece as a pair of pieces, ranked by the merged piece's score."""
    found = []
    for text, score, kind in pieces:
        if kind != NORMAL or len(text) < 2:
            continue
        for i in range(1, len(text)):
            left, right = text[:i], text[i:]
            if left in vocab and right in vocab:
                found.append((-score, vocab[text], vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(found)]


def convert(directory: Path) -> Tokenizer:
    """The checkpoint's tokenizer.model (with its added tokens and BOS setting) as a tokenizers Tokenizer."""
    spec = read_model(directory / "tokenizer.model")
    pieces = spec["pieces"]
    vocab = {text: i for i, (text, _, _) in enumerate(pieces)}
    unk = next((i for i, (_, _, kind) in enumerate(pieces) if kind == UNKNOWN), None)
    if spec["model_type"] == BPE:
        model = models.BPE(
            vocab,
            _merges(pieces, vocab),
            unk_token=None if unk is None else pieces[unk][0],
            fuse_unk=True,
            byte_fallback=spec["byte_fallback"],
        )
    else:
        model = models.Unigram([(text, score) for text, score, _ in pieces], unk, spec["byte_fallback"])
    tok = Tokenizer(model)
    steps = [normalizers.Precompiled(spec["charsmap"])] if spec["charsmap"] else []
    if spec["remove_extra_whitespaces"]:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec["add_dummy_prefix"]:
        steps.append(normalizers.Prepend("▁"))
    if spec["escape_whitespaces"]:
        steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if spec["add_dummy_prefix"] else [])
    )
    config = _json(directory / "tokenizer_config.json")
    added = {text: i for i, (text, _, kind) in enumerate(pieces) if kind in (CONTROL, USER_DEFINED)}
    added |= {str(k): int(v) for k, v in _json(directory / "added_tokens.json").items()}
    for i, entry in (config.get("added_tokens_decoder") or {}).items():
        added[entry["content"] if isinstance(entry, dict) else str(entry)] = int(i)
    beyond = sorted((i, t) for t, i in added.items() if i >= len(pieces))
    if [i for i, _ in beyond] != list(range(len(pieces), len(pieces) + len(beyond))):
        raise ConfigError(
            f"{directory}: added tokens beyond the model's {len(pieces)} pieces must follow on: {beyond[:5]}"
        )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added if added[t] < len(pieces)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for _, t in beyond])
    wrong = [t for t, i in added.items() if tok.token_to_id(t) != i]
    if wrong:
        raise ConfigError(f"{directory}: added tokens {wrong[:5]} do not land at their ids")
    bos = config.get("bos_token", "<s>")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    if config.get("add_bos_token", True) and bos is not None and tok.token_to_id(bos) is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
