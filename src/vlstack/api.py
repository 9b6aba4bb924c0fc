"""The public Python API: `load(path_or_name) -> VLM`; `VLM.chat`, `VLM.processor`, `VLM(input_ids, pixel_values)`."""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .adapters import Loaded
from .chat import TOKENIZER_FILES, Processor, question_messages, read_template, read_tokenizer
from .checkpoint import load_state_dict, save_checkpoint
from .config import VLMConfig, check_v2pe
from .engine.scheduler import Engine
from .errors import ConfigError, PromptError
from .image import ImageInput
from .layers.lora import LoRASpec, route
from .layers.quant import QuantConfig, quantized_layout
from .layers.step import packed_step, v2pe_rope
from .models import family, native_state, our_name
from .models.config_json import read_config, to_native
from .models.internvl import InternVL
from .models.llama import rotary
from .parallel.tp import TP, init, local_device, plan, shard
from .sampling import SamplingParams
from .templates import TEMPLATES
from .tiny import tiny_dir

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, cfg: VLMConfig, device: torch.device) -> torch.dtype:
    """Explicit dtype, else float32 on CPU and the checkpoint's dtype on an accelerator."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype or ("float32" if device.type == "cpu" else cfg.dtype)
    if name not in _DTYPES:
        raise ConfigError(f"dtype {name!r} is not supported; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def build_model(
    cfg: VLMConfig, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype, tp: TP | None = None
) -> InternVL:
    """Allocate the model directly from the state dict (no random init of weights that are overwritten); under
    tensor parallelism, this rank's part of it (each weight cut on the host, only the part moved to the device)."""
    with torch.device("meta"):
        model = InternVL(cfg)
    if cfg.quantization:  # its quantised layers as stored (layers/quant.py)
        quantized_layout(model, QuantConfig.from_json(cfg.quantization))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = set(shapes)
    if cfg.text.tie_word_embeddings:
        expected.discard("lm_head.weight")
        state.pop("lm_head.weight", None)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing weights: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected weights: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
        raise ConfigError("the checkpoint does not match its config: " + "; ".join(parts))
    for name, t in state.items():
        if tuple(t.shape) != shapes[name]:
            raise ConfigError(f"weight {name} has shape {tuple(t.shape)}, the config implies {shapes[name]}")
    if tp is not None:
        if cfg.quantization:
            raise ConfigError("tensor parallelism over a quantised checkpoint is not supported yet: use tp=1")
        plan(model, tp)
        state = {k: shard(v, tp.cuts.get(k)) for k, v in state.items()}
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.text.tie_word_embeddings:
        model.lm_head.weight = model.language_model.embed_tokens.weight
    model.language_model.rotary = rotary(cfg.text).to(device)  # (its buffers were on the meta device)
    return model.eval()


def eos_ids(directory: Path | None, cfg: VLMConfig, processor: Processor) -> set[int]:
    ids: set[int] = set()
    for source in (cfg.text.eos_token_id, _generation_eos(directory)):
        if source is not None:
            ids |= set(source) if isinstance(source, list) else {source}
    for token in ("<|im_end|>", "<|endoftext|>", *([TEMPLATES[cfg.template].stop] if cfg.template else [])):
        if (i := processor.token_id(token)) is not None:
            ids.add(i)
    return ids


def _generation_eos(directory: Path | None) -> int | list[int] | None:
    path = directory / "generation_config.json" if directory else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("eos_token_id")
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


class VLM:
    """An InternVL model with its processor, ready to chat."""

    def __init__(self, model: InternVL, processor: Processor, eos: set[int], directory: Path | None, name: str):
        self.model, self.processor, self.eos = model, processor, eos
        self.directory, self.name, self.cfg = directory, name, model.cfg
        self.adapters = Loaded(model)  # name -> LoRASpec, and each one's weights' sha256
        self._engine: Any = None  # the engine generation last ran on, kept (its KV cache, its captured graphs)
        self._engine_lock = threading.Lock()  # held by the generation using it

    def swap_model(self, model: InternVL) -> None:
        """Serve another model in this one's place (pruning's): its config; no adapters (they fit the old one)."""
        self.model, self.cfg, self.adapters, self._engine = model, model.cfg, Loaded(model), None

    def load_adapter(self, name: str, directory: str | Path) -> LoRASpec:
        """Attach a PEFT LoRA adapter under `name`; requests choose it with adapter=name."""
        return self.adapters.load(name, directory)

    def unload_adapter(self, name: str) -> None:
        self.adapters.unload(name)

    @property
    def adapter_hashes(self) -> dict[str, str]:
        """Each loaded adapter's weights file, sha256."""
        return self.adapters.hashes

    def engine(self, max_batch: int = 8, **limits: Any) -> Engine:
        """An engine over this model and its adapters (engine/scheduler.py's limits)."""
        return Engine(self.model, self.processor, self.eos, self.adapters, max_batch, **limits)

    @property
    def context_len(self) -> int:
        return self.cfg.text.max_position_embeddings

    def __call__(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, adapter: str | None = None
    ) -> torch.Tensor:
        """input_ids [B, T], pixel_values [N, 3, S, S] -> logits [B, T, vocab] (every row with adapter)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise PromptError("input_ids must be a tensor of integer token ids [batch, tokens]")
        vocab = self.cfg.text.vocab_size
        if input_ids.numel() and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < vocab:
            raise PromptError(f"input_ids hold ids outside the vocabulary [0, {vocab})")
        b, t = input_ids.shape
        with torch.inference_mode():
            lora = route(self.model, [adapter] * b, counts=[t] * b)
            n_slots = int((input_ids == self.cfg.image_token_id).sum())
            if n_slots and pixel_values is None:
                raise PromptError(f"the prompt has {n_slots} image tokens but no images were given")
            pv = pixel_values.to(self.model.device) if pixel_values is not None else None
            rope = v2pe_rope(list(input_ids), self.cfg.image_token_id, self.cfg.v2pe_delta)
            step = packed_step([t] * b, self.model.device, rope=rope)
            step.lora = lora
            return self.model(input_ids.flatten().to(self.model.device), step, pv).view(b, t, -1)

    def stream_batch(
        self,
        conversations: list[list[dict]],
        images: list[list[ImageInput]] | None = None,
        adapters: list[str | None] | None = None,
        usage: list[dict] | None = None,
        **generation: Any,
    ) -> Iterator[list[str]]:
        """Generate for several conversations at once, each with its adapter (None: the base model);
        yields the new text of each (\"\" if none yet). A list given as usage receives, at the end, each
        row's prompt_tokens, completion_tokens and finish_reason ("stop" or "length")."""
        params = SamplingParams(**generation)
        if not isinstance(conversations, list) or not conversations:
            raise PromptError("conversations must be a non-empty list (one list of messages per conversation)")
        for what, given in (("images", images), ("adapters", adapters)):
            if given is not None and (not isinstance(given, list) or len(given) != len(conversations)):
                n = len(given) if isinstance(given, list) else type(given).__name__
                raise PromptError(f"{what}: {n} for {len(conversations)} conversations (give one per conversation)")
        encoded = [self.processor(m, imgs) for m, imgs in zip(conversations, images or [None] * len(conversations))]
        prompts = [e["input_ids"][0] for e in encoded]
        longest = max(len(p) for p in prompts)
        if longest >= self.context_len:
            raise PromptError(f"the prompt is {longest} tokens, over the model's context of {self.context_len} tokens")
        cache_len = longest + min(params.max_new_tokens, self.context_len - longest)  # the KV cache this batch needs
        own = self._engine_lock.acquire(blocking=False)  # (another thread generating: an engine of its own)
        try:
            engine = self._engine if own else None
            if engine is None or engine.max_batch < len(encoded) or engine.max_len < cache_len:
                engine = self.engine(len(encoded), max_len=cache_len, image_cache_mb=0, background=False)
                self._engine = engine if own else self._engine
            adapters = adapters or [None] * len(encoded)
            rows = [engine.submit(e, a, dataclasses.replace(params)) for e, a in zip(encoded, adapters)]
            while not all(r.finished_at for r in rows):
                engine.step()
                failed = next((r for r in rows if r.exception is not None), None)
                if failed is not None:
                    raise failed.exception
                yield [_drain(r.out) for r in rows]
        finally:
            if own:
                if engine.running or engine.prefilling or not engine.waiting.empty():  # left mid-way: not reused
                    self._engine = None
                self._engine_lock.release()
        if usage is not None:
            usage[:] = [
                {"prompt_tokens": len(r.prompt), "completion_tokens": r.generated, "finish_reason": r.finish_reason}
                for r in rows
            ]

    def generate(
        self,
        conversations: list[list[dict]],
        images: list[list[ImageInput]] | None = None,
        adapters: list[str | None] | None = None,
        **generation: Any,
    ) -> list[str]:
        """Several conversations batched together -> the answer to each."""
        answers = [""] * len(conversations)
        for pieces in self.stream_batch(conversations, images, adapters, **generation):
            answers = [a + p for a, p in zip(answers, pieces)]
        return answers

    def stream(
        self,
        question: str,
        images: list[ImageInput] | ImageInput | None = None,
        history: list | None = None,
        system: str | None = None,
        adapter: str | None = None,
        **generation: Any,
    ) -> Iterator[str]:
        """Like chat, as an iterator of text pieces."""
        images = images if isinstance(images, list) else ([images] if images is not None else [])
        messages = question_messages(question, len(images), history, system)
        for pieces in self.stream_batch([messages], [images], [adapter], **generation):
            if pieces[0]:
                yield pieces[0]

    def chat(
        self,
        question: str,
        images: list[ImageInput] | ImageInput | None = None,
        history: list | None = None,
        system: str | None = None,
        adapter: str | None = None,
        **generation: Any,
    ) -> str:
        """Answer a question about zero or more images; history is [(question, answer), ...] or messages;
        adapter names a loaded LoRA adapter (None: the base model)."""
        return "".join(self.stream(question, images, history, system, adapter, **generation))

    def save(self, directory: str | Path) -> Path:
        """Write a transformers-native checkpoint (with the tokenizer files) to directory."""
        if self.model.tp is not None:
            raise ConfigError("a model loaded with tp > 1 holds a part of each weight: save it from a tp=1 load")
        state = {k: v for k, v in self.model.state_dict().items() if ".lora_" not in k}
        if self.cfg.text.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        extra = {}
        if self.directory is not None:
            for name in TOKENIZER_FILES + ("chat_template.json", "generation_config.json"):
                if (self.directory / name).is_file():
                    extra[name] = self.directory / name
        return save_checkpoint(directory, native_state(self.cfg.text, state), to_native(self.cfg), extra)


def _device(name: str | torch.device | None) -> torch.device:
    """The device to run on, checked: the default is a GPU when there is one."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ConfigError(f"{name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for, but this machine has no CUDA GPU available to torch")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r}: vlstack runs on cpu or cuda")
    return device


def _drain(out: queue.Queue) -> str:
    """The text pieces waiting in a request's output queue, joined (its end marker dropped)."""
    pieces = []
    while True:
        try:
            piece = out.get_nowait()
        except queue.Empty:
            return "".join(pieces)
        if piece is not None:
            pieces.append(piece)


def load(
    path_or_name: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    v2pe_delta: float | None = None,
    tp: int = 1,
) -> VLM:
    """Load a local InternVL checkpoint directory (either layout), or "tiny" for the built-in model.
    v2pe_delta: V2PE's position step for image tokens (InternVL3; default: the checkpoint's, else 1).
    tp: tensor parallelism over this many processes, one per device, started by torchrun (each runs the same
    program: every rank makes the same calls, and each gets every answer)."""
    device = local_device(_device(device)) if tp > 1 else _device(device)
    group = init(tp, device)
    if str(path_or_name) == "tiny":
        path_or_name = tiny_dir()
    directory = Path(path_or_name)
    if not directory.is_dir():
        raise ConfigError(f"{directory} is not a directory; vlstack loads local checkpoints only (or 'tiny')")
    cfg = read_config(directory)
    if v2pe_delta is not None:
        cfg.v2pe_delta = check_v2pe(v2pe_delta)
    tokenizer = read_tokenizer(directory)
    processor = Processor(tokenizer, cfg, read_template(directory, cfg.template))
    if cfg.layout == "internvl_chat":
        cfg.image_token_id = processor.img_context  # the original layout takes it from the tokenizer
    fam = family(cfg.text.model_type)
    state = load_state_dict(directory, cfg.vision.hidden_size, lambda name: our_name(fam, name))
    model = build_model(cfg, state, device, resolve_dtype(dtype, cfg, device), group)
    return VLM(model, processor, eos_ids(directory, cfg, processor), directory, directory.name)
