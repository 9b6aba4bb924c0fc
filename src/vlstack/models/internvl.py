"""InternVL: vision tower -> pixel shuffle -> MLP projector -> visual embeddings placed at the
<IMG_CONTEXT> positions of the language model's input. The one forward path every caller uses.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..config import VLMConfig
from ..errors import PromptError
from ..layers.activations import ACTIVATIONS
from ..layers.kv_cache import KVCache
from ..layers.lora_routing import Route, using
from ..layers.step import Step
from . import family
from .intern_vit import VisionTower

# The model's parts, the one table of them (read by LoRA's targets, quantisation, the pipeline's stages and
# pruning): where each part's Linear layers are, by module name; the decoder layer a weight is in.
PARTS = {
    "language": re.compile(r"language_model\.layers\.\d+\.(self_attn|mlp)\.\w+"),
    "vision": re.compile(r"vision_tower\.encoder\.layer\.\d+\.(attention|mlp)\.\w+"),
    "projector": re.compile(r"multi_modal_projector\.linear_[12]"),
}
MODULES = ("vision_tower", "multi_modal_projector", "language_model", "lm_head")  # the model's top level
DECODER_LAYER = re.compile(r"language_model\.layers\.(\d+)\.")


def part_of(name: str) -> str:
    """The part a parameter of the model belongs to, by its name: vision, projector or language (the rest)."""
    if name.startswith("vision_tower."):
        return "vision"
    return "projector" if name.startswith("multi_modal_projector.") else "language"


def layer_of(name: str) -> int | None:
    """The decoder layer a weight (or module) of the model is in, by its name; None: in none."""
    m = DECODER_LAYER.match(name)
    return None if m is None else int(m.group(1))


def under(name: str, prefix: str) -> bool:
    """Whether the weight `name` is `prefix` or inside the module `prefix` (dotted names)."""
    return name == prefix or name.startswith(prefix + ".")


def pixel_shuffle(x: torch.Tensor, ratio: float, version: str = "v2") -> torch.Tensor:
    """Fold each (1/ratio)² neighbourhood of patches into one token: [N, S, S, C] -> [N, S*r, S*r, C/r²].

    Same element order as InternVL's reference (v2 transposes back at the end; v1 did not).
    """
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * ratio), int(c / ratio))  # merge neighbours along one axis
    x = x.permute(0, 2, 1, 3)
    x = x.reshape(n, int(h * ratio), int(w * ratio), int(c / ratio**2))  # ... then along the other
    return x.permute(0, 2, 1, 3) if version == "v2" else x


class Projector(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        dim = cfg.vision.hidden_size * int(1 / cfg.downsample_ratio) ** 2
        self.layer_norm = nn.LayerNorm(dim)
        self.linear_1 = nn.Linear(dim, cfg.text.hidden_size)
        self.linear_2 = nn.Linear(cfg.text.hidden_size, cfg.text.hidden_size)
        self.act = ACTIVATIONS[cfg.projector_hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x))))


class InternVL(nn.Module):
    parts = PARTS

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg.vision)
        self.multi_modal_projector = Projector(cfg)
        self.language_model = family(cfg.text.model_type).LanguageModel(cfg.text)
        self.lora_aliases: dict[str, str] = getattr(family(cfg.text.model_type), "LORA_ALIASES", {})  # PEFT's -> ours
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if cfg.text.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight
        self.tp = None  # tensor parallelism (parallel/tp.py): the LLM split across ranks, each rank's logits gathered
        self.vision_always = False  # run the vision tower even on no tiles (sharded training: every process runs
        # every unit, train/fsdp.py)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def image_features(self, pixel_values: torch.Tensor, lora: Route | None = None) -> torch.Tensor:
        """pixel_values [N tiles, 3, S, S] -> visual embeddings [N, tokens per tile, LLM width]. lora: the route
        over the tiles (adapters of the vision tower and projector)."""
        with using(lora):
            x = self.vision_tower(pixel_values.to(self.dtype), self.cfg.vision_feature_layer)  # [N, P, C]
            n, p, c = x.shape
            side = int(p**0.5)
            x = pixel_shuffle(x.reshape(n, side, side, c), self.cfg.downsample_ratio, self.cfg.pixel_shuffle_version)
            return self.multi_modal_projector(x.flatten(1, 2))  # [N, p*r², LLM width]

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        lora: Route | None = None,
    ) -> torch.Tensor:
        """Token embeddings [T, C] with the visual embeddings at <IMG_CONTEXT> positions, in order: those of
        pixel_values, or `features` [N, P, C] already computed (the server's cache of visual embeddings). lora:
        the step's route (its adapters act on the tiles of their own sequences' images)."""
        embeds = self.language_model.embed_tokens(input_ids)
        if features is None and (pixel_values is None or not pixel_values.numel()) and not self.vision_always:
            return embeds  # (no images: an <IMG_CONTEXT> the model generated is an ordinary token, as in
            # transformers; a prompt's are checked by its callers. No count either: a decode step never waits)
        is_image = input_ids == self.cfg.image_token_id  # [T]
        if features is None and pixel_values is None:  # (vision_always: the tower over no tiles)
            side = self.cfg.vision.image_size
            pixel_values = embeds.new_zeros(0, 3, side, side)
        if features is None:
            tiles = lora.over_tiles(is_image, self.cfg.tokens_per_tile) if lora is not None and lora.segments else None
            features = self.image_features(pixel_values, tiles)  # [N, P, C]
        if not torch.compiler.is_compiling():  # (a count waits on the device; a compiled step's callers check it)
            n_slots, n_features = int(is_image.sum()), features.shape[0] * features.shape[1]
            if n_slots != n_features:
                raise PromptError(
                    f"the prompt has {n_slots} image tokens but the images give {n_features} "
                    f"({features.shape[0]} tiles x {features.shape[1]} tokens)"
                )
        return embeds.masked_scatter(is_image[..., None], features.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        step: Step,
        pixel_values: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        cache: KVCache | None = None,
        head: bool = True,
    ) -> torch.Tensor:
        """input_ids [T] (the step's sequences back to back; + pixel_values [N, 3, S, S] of their images, or their
        visual embeddings `features` [N, P, C]) -> logits [N, vocab] of the step's logit tokens (all T unless
        step.logits names some). head=False: the final hidden states [N, C] instead (training applies the head
        in chunks)."""
        hidden = self.language_model(self.embed(input_ids, pixel_values, features, step.lora), step, cache)  # [T, C]
        if step.logits is not None:
            hidden = hidden[step.logits]  # [N, C]
        if not head:
            return hidden
        logits = self.lm_head(hidden)  # [N, V] (under TP: this rank's part of the vocabulary)
        return logits if self.tp is None else self.tp.gather(logits, self.cfg.text.vocab_size)
