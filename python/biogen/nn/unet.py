"""Diffusion UNet (ADM-style) built on biogen's fused ops.

Every GroupNorm of the network goes through :func:`biogen.ops.group_norm_silu`: in the residual
blocks the time-embedding FiLM and the SiLU are fused into the same pass (the memory-bound
GroupNorm -> scale/shift -> SiLU chain is read and written once). Self-attention at low
resolutions uses :func:`biogen.ops.masked_gene_attention` with every token known (plain
bidirectional attention over pixels); cross-attention to condition tokens uses PyTorch SDPA.

Conditioning (RNA-CDM): condition tokens ``cond: (batch, cond_tokens, cond_dim)`` are attended to by
cross-attention at the attention levels and, mean-pooled and projected, added to the time
embedding. A learned null condition replaces the condition where ``cond_drop_mask`` is True (or
everywhere when ``cond`` is None), which is what classifier-free guidance trains and samples with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from biogen.ops import group_norm_silu, masked_gene_attention

__all__ = [
    "CrossAttention",
    "Downsample",
    "GroupNormAct",
    "ResBlock",
    "SelfAttention",
    "TimestepEmbedding",
    "UNet",
    "UNET_PRESETS",
    "UNetConfig",
    "Upsample",
    "unet_preset",
    "timestep_embedding",
]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t f_k), sin(t f_k)]``, ``f_k = max_period^(-k / (dim/2))``.

    t: (batch,) timesteps (integer or float); returns (batch, dim) float32 (a zero column pads odd dim).
    """
    if t.dim() != 1:
        raise ValueError(f"t must have shape (batch,), got {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding of width ``base`` followed by Linear -> SiLU -> Linear to ``dim``."""

    def __init__(self, base: int, dim: int) -> None:
        super().__init__()
        self.base = base
        self.mlp = nn.Sequential(nn.Linear(base, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: (batch,) -> (batch, dim)."""
        return self.mlp(timestep_embedding(t, self.base).to(self.mlp[0].weight.dtype))


class GroupNormAct(nn.Module):
    """GroupNorm with affine parameters, optional FiLM and SiLU (or identity), one fused op call."""

    def __init__(self, num_groups: int, channels: int, act: str = "silu", eps: float = 1e-5) -> None:
        super().__init__()
        if channels % num_groups:
            raise ValueError(f"channels ({channels}) must be divisible by num_groups ({num_groups})")
        self.num_groups, self.act, self.eps = num_groups, act, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x, scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None):
        """x: (batch, channels, H, W); scale, shift: (batch, channels) FiLM."""
        return group_norm_silu(x, self.num_groups, self.weight, self.bias, scale=scale, shift=shift,
                               eps=self.eps, act=self.act)


class ResBlock(nn.Module):
    """GN-SiLU -> conv3x3 -> GN-FiLM(time)-SiLU -> dropout -> conv3x3, plus a (1x1 conv) skip.

    The FiLM ``h * (1 + scale) + shift`` of the time embedding sits between the second GroupNorm
    and its SiLU (ADM's "scale-shift norm"), so the whole chain is one fused op. The last conv is
    zero-initialised: each block starts as the identity, which keeps deep UNets trainable.
    """

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, num_groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = GroupNormAct(num_groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(temb_dim, 2 * out_ch)
        self.norm2 = GroupNormAct(num_groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x: (batch, in_ch, H, W), temb: (batch, temb_dim) -> (batch, out_ch, H, W)."""
        h = self.conv1(self.norm1(x))
        scale, shift = self.emb(F.silu(temb)).chunk(2, dim=1)
        h = self.norm2(h, scale=scale.contiguous(), shift=shift.contiguous())
        return self.skip(x) + self.conv2(self.dropout(h))


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map (every token known), residual."""

    def __init__(self, channels: int, num_heads: int, num_groups: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.heads = num_heads
        self.norm = GroupNormAct(num_groups, channels, act="none")
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, channels, H, W) -> same shape."""
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, heads, H*W, head_dim)
        o = masked_gene_attention(q, k, v)
        o = o.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(o)


class CrossAttention(nn.Module):
    """Pixels (queries) attend to condition tokens ``(batch, T, cond_dim)`` (keys/values), residual."""

    def __init__(self, channels: int, cond_dim: int, num_heads: int, num_groups: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.heads = num_heads
        self.norm = GroupNormAct(num_groups, channels, act="none")
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(cond_dim, 2 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x: (batch, channels, H, W), cond: (batch, T, cond_dim) -> (batch, channels, H, W)."""
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        q = self.q(h).view(B, H * W, self.heads, -1).transpose(1, 2)
        k, v = self.kv(cond).view(B, cond.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)
        return x + self.proj(o).transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    """3x3 conv with stride 2 (halves H and W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@dataclass
class UNetConfig:
    """UNet hyper-parameters.

    Parameters
    ----------
    in_channels, out_channels : image channels in and predicted channels out.
    base_channels : width of the first level; level i has ``base_channels * channel_mult[i]``.
    channel_mult : per-level width multipliers (len = number of resolutions; each but the last
        halves H and W).
    num_res_blocks : residual blocks per level on the way down (one more on the way up).
    attention_levels : indices of levels with self-attention (and cross-attention when
        ``cond_dim`` is set); the middle block always has attention.
    num_heads : attention heads.
    num_groups : GroupNorm groups; must divide every width.
    dropout : inside residual blocks.
    cond_dim, cond_tokens : width and number of condition tokens; ``cond_dim=None`` is unconditional.
    time_embed_dim : width of the time embedding (default 4 * base_channels).
    """

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 64
    channel_mult: Sequence[int] = (1, 2, 3, 4)
    num_res_blocks: int = 2
    attention_levels: Sequence[int] = (2, 3)
    num_heads: int = 4
    num_groups: int = 32
    dropout: float = 0.0
    cond_dim: Optional[int] = None
    cond_tokens: int = 1
    time_embed_dim: Optional[int] = None

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attention_levels = tuple(int(a) for a in self.attention_levels)
        for name in ("in_channels", "out_channels", "base_channels", "num_res_blocks", "num_heads", "num_groups",
                     "cond_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult must be a non-empty sequence of positive integers, got {self.channel_mult}")
        bad = [a for a in self.attention_levels if not 0 <= a < len(self.channel_mult)]
        if bad:
            raise ValueError(f"attention_levels {bad} out of range for {len(self.channel_mult)} levels")
        for m in self.channel_mult:
            ch = self.base_channels * m
            if ch % self.num_groups:
                raise ValueError(
                    f"channels {ch} (base_channels {self.base_channels} x mult {m}) must be divisible by "
                    f"num_groups {self.num_groups}"
                )
        for a in self.attention_levels + (len(self.channel_mult) - 1,):
            ch = self.base_channels * self.channel_mult[a]
            if ch % self.num_heads:
                raise ValueError(f"attention width {ch} at level {a} must be divisible by num_heads {self.num_heads}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.cond_dim is not None and (not isinstance(self.cond_dim, int) or self.cond_dim < 1):
            raise ValueError(f"cond_dim must be a positive integer or None, got {self.cond_dim!r}")
        if self.time_embed_dim is None:
            self.time_embed_dim = 4 * self.base_channels

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


# RNA-CDM's base stage: 64x64 RGB tiles conditioned on the 200-d RNA beta-VAE latent (one token).
# "rnacdm_base" is GPU-sized; "rnacdm_base_cpu" keeps the topology (4 levels, attention at 16x16 and
# 8x8, cross-attention to the latent) at a width a laptop CPU samples in seconds per step.
UNET_PRESETS: dict[str, dict] = {
    "rnacdm_base": dict(in_channels=3, out_channels=3, base_channels=128, channel_mult=(1, 2, 3, 4),
                        num_res_blocks=2, attention_levels=(2, 3), num_heads=4, num_groups=32,
                        dropout=0.1, cond_dim=200, cond_tokens=1),
    "rnacdm_base_cpu": dict(in_channels=3, out_channels=3, base_channels=16, channel_mult=(1, 2, 3, 4),
                            num_res_blocks=1, attention_levels=(2, 3), num_heads=4, num_groups=8,
                            dropout=0.0, cond_dim=200, cond_tokens=1),
}


def unet_preset(name: str, **overrides) -> UNetConfig:
    """A :class:`UNetConfig` from :data:`UNET_PRESETS` with optional field overrides."""
    if name not in UNET_PRESETS:
        raise ValueError(f"unknown UNet preset {name!r}; choose one of {', '.join(UNET_PRESETS)}")
    return UNetConfig(**{**UNET_PRESETS[name], **overrides})


class _Level(nn.Module):
    def __init__(self, res: ResBlock, attn: Optional[SelfAttention], xattn: Optional[CrossAttention]) -> None:
        super().__init__()
        self.res, self.attn, self.xattn = res, attn, xattn

    def forward(self, x, temb, cond):
        x = self.res(x, temb)
        if self.attn is not None:
            x = self.attn(x)
        if self.xattn is not None:
            x = self.xattn(x, cond)
        return x


class UNet(nn.Module):
    """Conditional diffusion UNet; ``forward(x, t, cond=None, cond_drop_mask=None)``.

    x: (batch, in_channels, H, W) with H, W divisible by ``2 ** (levels - 1)``; t: (batch,) or a
    scalar timestep; cond: (batch, cond_tokens, cond_dim) or (batch, cond_dim) (one token);
    cond_drop_mask: (batch,) bool, True = use the learned null condition. Returns
    (batch, out_channels, H, W).
    """

    def __init__(self, config: Optional[UNetConfig] = None, **kwargs) -> None:
        super().__init__()
        if config is not None and kwargs:
            raise TypeError("pass either a UNetConfig or keyword options, not both")
        cfg = config if config is not None else UNetConfig(**kwargs)
        self.config = cfg
        G, temb = cfg.num_groups, cfg.time_embed_dim
        self.time_embed = TimestepEmbedding(cfg.base_channels, temb)
        if cfg.cond_dim is not None:
            self.null_cond = nn.Parameter(torch.randn(cfg.cond_tokens, cfg.cond_dim) * 0.02)
            self.cond_proj = nn.Sequential(nn.Linear(cfg.cond_dim, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1)

        def level(cin, cout, i):
            has_attn = i in cfg.attention_levels
            return _Level(
                ResBlock(cin, cout, temb, G, cfg.dropout),
                SelfAttention(cout, cfg.num_heads, G) if has_attn else None,
                CrossAttention(cout, cfg.cond_dim, cfg.num_heads, G) if has_attn and cfg.cond_dim else None,
            )

        self.down = nn.ModuleList()
        skips = [cfg.base_channels]
        ch = cfg.base_channels
        n_levels = len(cfg.channel_mult)
        for i, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(level(ch, cfg.base_channels * mult, i))
                ch = cfg.base_channels * mult
                skips.append(ch)
            if i < n_levels - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)
        last = n_levels - 1
        self.mid = nn.ModuleList([level(ch, ch, last), _Level(ResBlock(ch, ch, temb, G, cfg.dropout), None, None)])
        if self.mid[0].attn is None:  # the middle always attends, whatever attention_levels says
            self.mid[0].attn = SelfAttention(ch, cfg.num_heads, G)
            if cfg.cond_dim:
                self.mid[0].xattn = CrossAttention(ch, cfg.cond_dim, cfg.num_heads, G)
        self.up = nn.ModuleList()
        for i in reversed(range(n_levels)):
            out = cfg.base_channels * cfg.channel_mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(level(ch + skips.pop(), out, i))
                ch = out
            if i > 0:
                self.up.append(Upsample(ch))
        self.norm_out = GroupNormAct(G, ch)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _condition(self, cond, cond_drop_mask, batch: int, dtype, device):
        cfg = self.config
        if cfg.cond_dim is None:
            if cond is not None or cond_drop_mask is not None:
                raise ValueError("this UNet is unconditional (cond_dim=None); pass cond=None")
            return None
        null = self.null_cond.to(dtype)[None].expand(batch, -1, -1)
        if cond is None:
            if cond_drop_mask is not None:
                raise ValueError("cond_drop_mask needs cond")
            return null
        if cond.dim() == 2:
            cond = cond[:, None]
        if cond.dim() != 3 or cond.shape[0] != batch or cond.shape[2] != cfg.cond_dim or cond.shape[1] != cfg.cond_tokens:
            raise ValueError(
                f"cond must have shape (batch={batch}, cond_tokens={cfg.cond_tokens}, cond_dim={cfg.cond_dim}) "
                f"or (batch, cond_dim), got {tuple(cond.shape)}"
            )
        cond = cond.to(dtype)
        if cond_drop_mask is not None:
            if cond_drop_mask.shape != (batch,) or cond_drop_mask.dtype != torch.bool:
                raise ValueError(
                    f"cond_drop_mask must be a bool tensor of shape ({batch},), got {cond_drop_mask.dtype} "
                    f"{tuple(cond_drop_mask.shape)}"
                )
            cond = torch.where(cond_drop_mask.to(cond.device)[:, None, None], null, cond)
        return cond

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: Optional[torch.Tensor] = None,
        cond_drop_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        cfg = self.config
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must have shape (batch, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        f = cfg.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"H and W must be divisible by {f} ({len(cfg.channel_mult)} levels), got {tuple(x.shape[2:])}")
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"t must be a scalar or have shape ({B},), got {tuple(t.shape)}")
        temb = self.time_embed(t).to(x.dtype)
        c = self._condition(cond, cond_drop_mask, B, x.dtype, x.device)
        if c is not None:
            temb = temb + self.cond_proj(c.mean(dim=1))

        h = self.conv_in(x)
        hs = [h]
        for m in self.down:
            h = m(h) if isinstance(m, Downsample) else m(h, temb, c)
            hs.append(h)
        for m in self.mid:
            h = m(h, temb, c)
        for m in self.up:
            if isinstance(m, Upsample):
                h = m(h)
            else:
                h = m(torch.cat([h, hs.pop()], dim=1), temb, c)
        return self.conv_out(self.norm_out(h))
