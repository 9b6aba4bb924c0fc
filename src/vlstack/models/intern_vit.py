"""InternViT: the vision encoder of InternVL.

Patch embedding (Conv2d, stride = patch) + class token + absolute position embeddings, then pre-norm
blocks with layer scale on both residual branches. Module names follow transformers' InternVL so that
checkpoints and PEFT adapters map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from ..layers.activations import ACTIVATIONS
from ..layers.norm import RMSNorm, make_norm


class PatchEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.projection = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)


class Embeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        n = cfg.patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, n + 1, cfg.hidden_size))
        self.patch_embeddings = PatchEmbeddings(cfg)

    def positions(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings for an h×w patch grid, bicubically interpolated if it differs from training."""
        pos = self.position_embeddings  # [1, 1 + S*S, C]
        side = int((pos.shape[1] - 1) ** 0.5)
        if h == w == side:
            return pos
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)  # [1, C, S, S]
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        proj = self.patch_embeddings.projection
        x = proj(pixel_values.to(proj.weight.dtype))  # [N, C, h, w]
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # [N, h*w, C]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # [N, 1 + h*w, C]
        return x + self.positions(h, w)


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        dim = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(dim, dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(dim, dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(dim, dim, bias=cfg.attention_bias)
        self.projection_layer = nn.Linear(dim, dim)
        # the 6B encoder normalises q and k over the full width (all heads together)
        self.q_norm = RMSNorm(dim, cfg.layer_norm_eps) if cfg.use_qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim, cfg.layer_norm_eps) if cfg.use_qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        h, d = self.num_heads, c // self.num_heads  # (d named: no tiles at all is a valid batch)
        q = self.q_norm(self.q_proj(x)).view(n, t, h, d).transpose(1, 2)  # [N, H, T, D]
        k = self.k_norm(self.k_proj(x)).view(n, t, h, d).transpose(1, 2)
        v = self.v_proj(x).view(n, t, h, d).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)  # [N, H, T, D]
        return self.projection_layer(y.transpose(1, 2).reshape(n, t, c))


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.mlp = MLP(cfg)
        self.layernorm_before = make_norm(cfg.norm_type, cfg.hidden_size, cfg.layer_norm_eps)
        self.layernorm_after = make_norm(cfg.norm_type, cfg.hidden_size, cfg.layer_norm_eps)
        self.lambda_1 = nn.Parameter(torch.ones(cfg.hidden_size))  # layer scale
        self.lambda_2 = nn.Parameter(torch.ones(cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.lambda_1 * self.attention(self.layernorm_before(x))
        return x + self.lambda_2 * self.mlp(self.layernorm_after(x))


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.layernorm = nn.Identity() if cfg.use_mean_pooling else nn.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, feature_layer: int = -1) -> torch.Tensor:
        """pixel_values [N, 3, S, S] -> features of the selected layer, class token dropped: [N, P, C].

        feature_layer indexes the hidden states [embeddings, layer 1, ..., layer L]; -1 is the output of
        the last layer after the final norm (an identity unless the config asks for one).
        """
        x = self.embeddings(pixel_values)  # [N, 1 + P, C]
        n_layers = len(self.encoder.layer)
        stop = n_layers if feature_layer == -1 else feature_layer % (n_layers + 1)
        for layer in self.encoder.layer[:stop]:  # layers past the selected one are not run
            x = layer(x)
        if feature_layer == -1:
            x = self.layernorm(x)
        return x[:, 1:]
