"""Denoiser backbones F(x, c_noise, class) used by Consistency Models (Song et al., ICML 2023).

Two UNet families, written after the architecture descriptions in the EDM paper (Karras et al., 2022,
appendix F) and the papers they come from:

* `SongUNet` -- NCSN++ / DDPM++ (Song et al., ICLR 2021), the CIFAR-10 network of the paper.
* `ADMUNet`  -- ADM (Dhariwal & Nichol, 2021), the ImageNet 64 and LSUN 256 network of the paper.

Only the raw network lives here; the preconditioning (c_skip, c_out, c_in, c_noise) is applied by the caller.
Both take `forward(x, noise_labels, class_labels=None)` and return a tensor shaped like x with out_channels.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ADMUNet", "SongUNet", "build_network", "count_parameters"]

# ----------------------------------------------------------------------------------------------------------
# Weight initialisation.
# The SongUNet family uses xavier_uniform everywhere, with zero bias; the last conv of every residual block,
# the attention output projection and the final output conv are scaled by 1e-5 ("init_zero"), so every
# block starts as (nearly) the identity and the network starts by predicting ~0 -- this is what keeps deep
# residual stacks stable early in training. The attention qkv projection is scaled by sqrt(0.2).
# ADM uses PyTorch's default layer init (uniform, bound 1/sqrt(fan_in) for weight and bias, written below
# as kaiming_uniform scaled by sqrt(1/3)) and exact zeros for the same "last" layers.


def _fill_init(tensor: torch.Tensor, mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    if mode == "xavier_uniform":
        bound = math.sqrt(6 / (fan_in + fan_out))
        return tensor.uniform_(-bound, bound)
    if mode == "xavier_normal":
        return tensor.normal_(0, math.sqrt(2 / (fan_in + fan_out)))
    if mode == "kaiming_uniform":
        bound = math.sqrt(3 / fan_in)
        return tensor.uniform_(-bound, bound)
    if mode == "kaiming_normal":
        return tensor.normal_(0, math.sqrt(1 / fan_in))
    raise ValueError(f"unknown init_mode {mode!r}")


class Linear(nn.Module):
    """Fully connected layer with explicit (mode, scale) initialisation."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        with torch.no_grad():
            _fill_init(self.weight, init_mode, in_features, out_features).mul_(init_weight)
            if self.bias is not None:
                _fill_init(self.bias, init_mode, in_features, out_features).mul_(init_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv2d(nn.Module):
    """Same-padding conv with optional 2x up/down sampling through a separable FIR filter.

    kernel=0 gives a parameter-free resampler. With `fused_down` the conv runs at full resolution and the
    FIR filter then decimates (used by the NCSN++ residual input pyramid); otherwise resampling comes first.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 up: bool = False, down: bool = False, resample_filter: Sequence[int] = (1, 1),
                 fused_down: bool = False, init_mode: str = "kaiming_normal", init_weight: float = 1.0,
                 init_bias: float = 0.0):
        if up and down:
            raise ValueError("Conv2d cannot both upsample and downsample")
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_down = up, down, fused_down and down and kernel > 0
        fan_in, fan_out = in_channels * kernel * kernel, out_channels * kernel * kernel
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel)) if kernel else None
        self.bias = nn.Parameter(torch.empty(out_channels)) if kernel and bias else None
        with torch.no_grad():
            if self.weight is not None:
                _fill_init(self.weight, init_mode, fan_in, fan_out).mul_(init_weight)
            if self.bias is not None:
                _fill_init(self.bias, init_mode, fan_in, fan_out).mul_(init_bias)
        # 2-D filter = outer product of the 1-D taps, normalised to unit DC gain.
        taps = torch.as_tensor(resample_filter, dtype=torch.float32)
        self.register_buffer("resample_filter", (taps.outer(taps) / taps.sum().square())[None, None],
                             persistent=False)

    def _fir_down(self, x: torch.Tensor, padding: int) -> torch.Tensor:
        f = self.resample_filter.to(x.dtype).tile(x.shape[1], 1, 1, 1)
        return F.conv2d(x, f, groups=x.shape[1], stride=2, padding=padding)

    def _fir_up(self, x: torch.Tensor) -> torch.Tensor:
        # Gain 4 because zero-insertion leaves 1 of every 4 output pixels non-zero.
        f = self.resample_filter.to(x.dtype).mul(4).tile(x.shape[1], 1, 1, 1)
        pad = (f.shape[-1] - 1) // 2
        return F.conv_transpose2d(x, f, groups=x.shape[1], stride=2, padding=pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = (self.resample_filter.shape[-1] - 1) // 2
        if self.fused_down:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = self._fir_down(x, padding=0)
        else:
            if self.up:
                x = self._fir_up(x)
            if self.down:
                x = self._fir_down(x, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


def group_norm(channels: int, eps: float, groups: int | None = None) -> nn.GroupNorm:
    # Default: up to 32 groups, but never fewer than 4 channels per group (matters only for narrow test/demo nets).
    # groups fixes the count instead (OpenAI's GroupNorm32 always has 32; the same for >= 128 channels).
    num_groups = max(1, min(32, channels // 4)) if groups is None else groups
    return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=eps)


# ----------------------------------------------------------------------------------------------------------
# Noise-level embeddings.


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of a scalar; `endpoint=True` is the DDPM++ frequency spacing."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        exponents = torch.arange(half, dtype=torch.float32, device=x.device) / (half - int(self.endpoint))
        freqs = (1 / self.max_positions) ** exponents
        angles = x.float().outer(freqs)
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Gaussian random Fourier features (NCSN++): fixed frequencies ~ N(0, scale^2), never trained."""

    def __init__(self, num_channels: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = x.float().outer(2 * math.pi * self.freqs.float())
        return torch.cat([angles.cos(), angles.sin()], dim=1)


# ----------------------------------------------------------------------------------------------------------
# Building blocks.


class SelfAttention(nn.Module):
    """Multi-head self-attention over pixels, as a residual branch (x + proj(attn(norm(x)))) * skip_scale."""

    def __init__(self, channels: int, num_heads: int, eps: float, skip_scale: float,
                 init_qkv: dict, init_zero: dict, norm_groups: int | None = None):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention channels {channels} not divisible by num_heads {num_heads}")
        self.num_heads, self.skip_scale = num_heads, skip_scale
        self.norm = group_norm(channels, eps, norm_groups)
        self.qkv = Conv2d(channels, channels * 3, kernel=1, **init_qkv)
        self.proj = Conv2d(channels, channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
        # Explicit softmax in at least fp32 rather than F.scaled_dot_product_attention: the fused kernels lack
        # forward-mode AD, which continuous-time consistency training (torch.func.jvp) needs.
        precision = torch.promote_types(q.dtype, torch.float32)  # fp16/bf16 -> fp32; float64 stays float64
        # q and k each scaled by d^(-1/4) before the product, not the product by d^(-1/2) after it: under fp16
        # autocast the einsum runs as an fp16 bmm whatever q's dtype, and q.k could overflow before the division
        # (the official fp16 code scales first too). The same logits in fp32, to rounding.
        scale = (c // self.num_heads) ** -0.25
        logits = torch.einsum("bncq,bnck->bnqk", q.to(precision) * scale, k.to(precision) * scale)
        a = torch.einsum("bnqk,bnck->bncq", logits.softmax(dim=-1).to(v.dtype), v)
        return (x + self.proj(a.reshape(b, c, h, w))) * self.skip_scale


class ResidualBlock(nn.Module):
    """BigGAN-style residual block conditioned on the embedding, optionally resampling and attending.

    adaptive_scale=False adds a per-channel bias from the embedding (NCSN++/DDPM++); True applies a
    scale-shift after GroupNorm (ADM's use_scale_shift_norm).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: int = 1, dropout: float = 0.0,
                 skip_scale: float = 1.0, eps: float = 1e-5, resample_filter: Sequence[int] = (1, 1),
                 resample_proj: bool = False, adaptive_scale: bool = True, init: dict | None = None,
                 init_zero: dict | None = None, init_attn: dict | None = None, norm_groups: int | None = None):
        super().__init__()
        init = init or {}
        init_zero = init_zero if init_zero is not None else dict(init, init_weight=0)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.skip_scale, self.adaptive_scale = skip_scale, adaptive_scale
        self.norm0 = group_norm(in_channels, eps, norm_groups)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down,
                            resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = group_norm(out_channels, eps, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if in_channels != out_channels or up or down:
            # A 1x1 projection when channels change (or always, with resample_proj); else pure resampling.
            kernel = 1 if resample_proj or in_channels != out_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)
        self.attn = None
        if attention:
            init_qkv = init_attn if init_attn is not None else init
            self.attn = SelfAttention(out_channels, num_heads, eps, skip_scale, init_qkv, init_zero, norm_groups)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(self.dropout(h))
        x = (h + (x if self.skip is None else self.skip(x))) * self.skip_scale
        return x if self.attn is None else self.attn(x)


def _class_embedding_input(class_labels: torch.Tensor | None, label_dim: int, batch: int, training: bool,
                           label_dropout: float) -> torch.Tensor | None:
    """Validate one-hot labels and apply label dropout (zeroing whole rows = the unconditional input)."""
    if label_dim == 0:
        return None  # unconditional net: labels, if any, are ignored
    if class_labels is None:
        raise ValueError(f"network is class-conditional (label_dim={label_dim}) but class_labels is None; "
                         "pass zeros for the unconditional input")
    if class_labels.shape != (batch, label_dim):
        raise ValueError(f"class_labels must have shape ({batch}, {label_dim}), "
                         f"got {tuple(class_labels.shape)}")
    if training and label_dropout:
        keep = torch.rand(batch, 1, device=class_labels.device) >= label_dropout
        class_labels = class_labels * keep.to(class_labels.dtype)
    return class_labels


def _noise_batch(noise_labels: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    # float32 whatever comes in: the sinusoids of large c_noise values need the precision.
    noise_labels = torch.as_tensor(noise_labels, dtype=torch.float32, device=device)
    if noise_labels.ndim == 0:
        noise_labels = noise_labels.expand(batch)
    if noise_labels.shape != (batch,):
        raise ValueError(f"noise_labels must have shape ({batch},), got {tuple(noise_labels.shape)}")
    return noise_labels


def _check_resolution(img_resolution: int, num_levels: int) -> None:
    if img_resolution % (1 << (num_levels - 1)):
        raise ValueError(f"img_resolution {img_resolution} is not divisible by 2^{num_levels - 1} "
                         f"({num_levels} resolution levels)")


# ----------------------------------------------------------------------------------------------------------
# NCSN++ / DDPM++.


class SongUNet(nn.Module):
    """NCSN++ / DDPM++ UNet (Song et al., 2021). Defaults are DDPM++ at CIFAR-10 size.

    NCSN++ = embedding_type 'fourier', channel_mult_noise 2, encoder_type 'residual', resample_filter
    (1, 3, 3, 1); DDPM++ = 'positional', 1, 'standard', (1, 1). Residual branches are rescaled by 1/sqrt(2).
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 model_channels: int = 128, channel_mult: Sequence[int] = (2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0.0, embedding_type: str = "positional",
                 channel_mult_noise: int = 1, encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: Sequence[int] = (1, 1), fourier_scale: float = 16.0):
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"embedding_type must be 'positional' or 'fourier', got {embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"encoder_type must be 'standard', 'skip' or 'residual', got {encoder_type!r}")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type must be 'standard' or 'skip', got {decoder_type!r}")
        _check_resolution(img_resolution, len(channel_mult))
        super().__init__()
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim, self.label_dropout = label_dim, label_dropout
        self.encoder_type, self.decoder_type = encoder_type, decoder_type
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = {"init_mode": "xavier_uniform"}
        init_zero = {"init_mode": "xavier_uniform", "init_weight": 1e-5}
        init_attn = {"init_mode": "xavier_uniform", "init_weight": math.sqrt(0.2)}
        block_kwargs = {"emb_channels": emb_channels, "num_heads": 1, "dropout": dropout,
                        "skip_scale": math.sqrt(0.5), "eps": 1e-6, "resample_filter": resample_filter,
                        "resample_proj": True, "adaptive_scale": False,
                        "init": init, "init_zero": init_zero, "init_attn": init_attn}

        # Embedding of c_noise (and class label) -> emb_channels vector shared by all blocks.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels, scale=fourier_scale)  # iCT: 0.02
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder. Level 0 starts with a 3x3 conv; deeper levels start with a downsampling residual block,
        # and (NCSN++) an input-pyramid branch that re-injects the downsampled image ("skip") or a
        # running residual of it ("residual").
        self.stem = Conv2d(in_channels, model_channels, kernel=3, **init)
        self.enc_down = nn.ModuleList()
        self.enc_aux = nn.ModuleList()
        self.enc_blocks = nn.ModuleList()
        skip_channels = [model_channels]
        cout, caux = model_channels, in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level > 0:
                self.enc_down.append(ResidualBlock(cout, cout, down=True, **block_kwargs))
                if encoder_type == "skip":
                    self.enc_aux.append(Conv2d(caux, cout, kernel=1, **init))
                elif encoder_type == "residual":
                    self.enc_aux.append(Conv2d(caux, cout, kernel=3, down=True, fused_down=True,
                                               resample_filter=resample_filter, **init))
                    caux = cout
                skip_channels.append(cout)
            blocks = nn.ModuleList()
            for _ in range(num_blocks):
                cin, cout = cout, model_channels * mult
                blocks.append(ResidualBlock(cin, cout, attention=res in attn_resolutions, **block_kwargs))
                skip_channels.append(cout)
            self.enc_blocks.append(blocks)
        # Parameter-free FIR downsampler for the "skip" input pyramid.
        self.aux_down = Conv2d(in_channels, in_channels, kernel=0, down=True, resample_filter=resample_filter)

        # Decoder, from the lowest resolution up. Each level ends with num_blocks + 1 blocks consuming the
        # encoder skips; output heads sit at level 0 ("standard") or every level, summed upward ("skip").
        self.mid = nn.ModuleList([ResidualBlock(cout, cout, attention=True, **block_kwargs),
                                  ResidualBlock(cout, cout, **block_kwargs)])
        self.dec_up = nn.ModuleList()
        self.dec_blocks = nn.ModuleList()
        self.dec_heads = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level < len(channel_mult) - 1:
                self.dec_up.append(ResidualBlock(cout, cout, up=True, **block_kwargs))
            blocks = nn.ModuleList()
            for idx in range(num_blocks + 1):
                cin, cout = cout + skip_channels.pop(), model_channels * mult
                attention = idx == num_blocks and res in attn_resolutions
                blocks.append(ResidualBlock(cin, cout, attention=attention, **block_kwargs))
            self.dec_blocks.append(blocks)
            if decoder_type == "skip" or level == 0:
                self.dec_heads.append(nn.Sequential(group_norm(cout, eps=1e-6), nn.SiLU(),
                                                    Conv2d(cout, out_channels, kernel=3, **init_zero)))
        self.aux_up = Conv2d(out_channels, out_channels, kernel=0, up=True, resample_filter=resample_filter)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        batch = x.shape[0]
        emb = self.map_noise(_noise_batch(noise_labels, batch, x.device))
        labels = _class_embedding_input(class_labels, self.label_dim, batch, self.training,
                                        self.label_dropout)
        if labels is not None:
            # sqrt(label_dim) keeps the one-hot input at unit mean square per feature.
            emb = emb + self.map_label(labels.to(emb.dtype) * math.sqrt(self.label_dim))
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        image = x
        x = self.stem(x)
        skips = [x]
        for level, blocks in enumerate(self.enc_blocks):
            if level > 0:
                x = self.enc_down[level - 1](x, emb)
                if self.encoder_type == "skip":
                    image = self.aux_down(image)
                    x = x + self.enc_aux[level - 1](image)
                elif self.encoder_type == "residual":
                    x = image = (x + self.enc_aux[level - 1](image)) * math.sqrt(0.5)
                skips.append(x)
            for block in blocks:
                x = block(x, emb)
                skips.append(x)

        for block in self.mid:
            x = block(x, emb)
        out, heads = None, iter(self.dec_heads)
        for i, blocks in enumerate(self.dec_blocks):
            if i > 0:
                x = self.dec_up[i - 1](x, emb)
            for block in blocks:
                x = block(torch.cat([x, skips.pop()], dim=1), emb)
            if self.decoder_type == "skip" or i == len(self.dec_blocks) - 1:
                head = next(heads)(x)
                out = head if out is None else head + self.aux_up(out)
        return out


# ----------------------------------------------------------------------------------------------------------
# ADM.


class ADMUNet(nn.Module):
    """ADM UNet (Dhariwal & Nichol, 2021): residual-block up/down sampling (resblock_updown), attention with
    `attn_head_channels` per head at every block of the listed resolutions, positional noise embedding,
    class labels through a bias-free linear map (an embedding table for one-hot input).

    scale_shift_norm=True conditions blocks by scale-shift after GroupNorm (ADM's use_scale_shift_norm);
    False adds a bias before it. The paper uses True for ImageNet 64 (the defaults here, ~296M params)
    and False for LSUN 256 (256 channels, mult (1, 1, 2, 2, 4, 4), 2 blocks: ~526M; with True it is ~553M).
    norm_groups fixes the GroupNorm group count (None: up to 32, >= 4 channels each); OpenAI's UNetModel always
    uses 32, which only differs for nets narrower than 128 channels (pipeline.import_openai).
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 model_channels: int = 192, channel_mult: Sequence[int] = (1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3,
                 attn_resolutions: Sequence[int] = (32, 16, 8), dropout: float = 0.10,
                 label_dropout: float = 0.0, attn_head_channels: int = 64, scale_shift_norm: bool = True,
                 norm_groups: int | None = None):
        _check_resolution(img_resolution, len(channel_mult))
        super().__init__()
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim, self.label_dropout = label_dim, label_dropout
        emb_channels = model_channels * channel_mult_emb
        # PyTorch-default init (uniform, bound 1/sqrt(fan_in)) for weights and biases; zeros for last layers.
        pytorch_default = 1 / math.sqrt(3)
        init = {"init_mode": "kaiming_uniform", "init_weight": pytorch_default, "init_bias": pytorch_default}
        init_zero = {"init_mode": "kaiming_uniform", "init_weight": 0.0, "init_bias": 0.0}

        def block(cin: int, cout: int, attention: bool = False, **kwargs) -> ResidualBlock:
            # At least one head, so narrow test/demo nets still exercise attention.
            heads = max(1, cout // attn_head_channels)
            return ResidualBlock(cin, cout, emb_channels=emb_channels, attention=attention, num_heads=heads,
                                 dropout=dropout, skip_scale=1.0, eps=1e-5, resample_filter=(1, 1),
                                 resample_proj=False, adaptive_scale=scale_shift_norm, init=init,
                                 init_zero=init_zero, norm_groups=norm_groups, **kwargs)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        # std-1 normal weights, i.e. what an nn.Embedding table would hold.
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        cout = model_channels * channel_mult[0]
        self.stem = Conv2d(in_channels, cout, kernel=3, **init)
        self.enc_down = nn.ModuleList()
        self.enc_blocks = nn.ModuleList()
        skip_channels = [cout]
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level > 0:
                self.enc_down.append(block(cout, cout, down=True))
                skip_channels.append(cout)
            blocks = nn.ModuleList()
            for _ in range(num_blocks):
                cin, cout = cout, model_channels * mult
                blocks.append(block(cin, cout, attention=res in attn_resolutions))
                skip_channels.append(cout)
            self.enc_blocks.append(blocks)

        self.mid = nn.ModuleList([block(cout, cout, attention=True), block(cout, cout)])
        self.dec_up = nn.ModuleList()
        self.dec_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level < len(channel_mult) - 1:
                self.dec_up.append(block(cout, cout, up=True))
            blocks = nn.ModuleList()
            for _ in range(num_blocks + 1):
                cin, cout = cout + skip_channels.pop(), model_channels * mult
                blocks.append(block(cin, cout, attention=res in attn_resolutions))
            self.dec_blocks.append(blocks)
        self.out_norm = group_norm(cout, eps=1e-5, groups=norm_groups)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        batch = x.shape[0]
        emb = self.map_noise(_noise_batch(noise_labels, batch, x.device))
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        labels = _class_embedding_input(class_labels, self.label_dim, batch, self.training,
                                        self.label_dropout)
        if labels is not None:
            emb = emb + self.map_label(labels.to(emb.dtype))
        emb = F.silu(emb)

        x = self.stem(x)
        skips = [x]
        for level, blocks in enumerate(self.enc_blocks):
            if level > 0:
                x = self.enc_down[level - 1](x, emb)
                skips.append(x)
            for blk in blocks:
                x = blk(x, emb)
                skips.append(x)
        for blk in self.mid:
            x = blk(x, emb)
        for i, blocks in enumerate(self.dec_blocks):
            if i > 0:
                x = self.dec_up[i - 1](x, emb)
            for blk in blocks:
                x = blk(torch.cat([x, skips.pop()], dim=1), emb)
        return self.out_conv(F.silu(self.out_norm(x)))


# ----------------------------------------------------------------------------------------------------------
# Factory.

# Family defaults on top of the class defaults; anything here can be overridden by keyword.
# ----------------------------------------------------------------------------------------------------------
# MLP: for low-dimensional data (the proof preset's 3x8x8 mixture), where a UNet's cost buys nothing.


class MLPBlock(nn.Module):
    """h + Linear(dropout(SiLU(Linear(SiLU(h)) + emb))): a residual block on flat features, the noise embedding
    added to its hidden layer (as the UNets' residual blocks add it to their feature maps)."""

    def __init__(self, width: int, emb_channels: int, dropout: float):
        super().__init__()
        self.inner = Linear(width, width, init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3))
        self.emb = Linear(emb_channels, width, init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3))
        self.outer = Linear(width, width, init_mode="kaiming_uniform", init_weight=1e-5)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        hidden = F.silu(self.inner(F.silu(h)) + self.emb(emb))
        return h + self.outer(self.dropout(hidden))


class MLPNet(nn.Module):
    """A residual MLP on the flattened image: width model_channels * m for each m in channel_mult, num_blocks
    blocks at each width, a positional embedding of the noise label (and an embedding of class labels) added in
    every block (Fourier features of it by default, as NCSN++). The same interface as the UNets; it has no
    resolution levels, so no attention."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 model_channels: int = 256, channel_mult: Sequence[int] = (1,), channel_mult_emb: int = 1,
                 num_blocks: int = 2, attn_resolutions: Sequence[int] = (), dropout: float = 0.0,
                 label_dropout: float = 0.0, embedding_type: str = "fourier"):
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"embedding_type must be 'positional' or 'fourier', got {embedding_type!r}")
        if attn_resolutions:
            raise ValueError(f"arch mlp has no resolution levels: attn_resolutions must be [], got "
                             f"{list(attn_resolutions)}")
        super().__init__()
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim, self.label_dropout = label_dim, label_dropout
        emb_channels = model_channels * channel_mult_emb
        self.map_noise = (FourierEmbedding(model_channels) if embedding_type == "fourier"
                          else PositionalEmbedding(model_channels, endpoint=True))
        self.map_label = Linear(label_dim, emb_channels, init_mode="kaiming_normal") if label_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, init_mode="kaiming_uniform")
        self.map_layer1 = Linear(emb_channels, emb_channels, init_mode="kaiming_uniform")
        widths = [model_channels * m for m in channel_mult]
        self.layers = nn.ModuleList()
        width = in_channels * img_resolution**2
        for w in widths:
            self.layers.append(Linear(width, w, init_mode="kaiming_uniform"))  # a projection to the new width
            self.layers.extend(MLPBlock(w, emb_channels, dropout) for _ in range(num_blocks))
            width = w
        self.head = Linear(width, out_channels * img_resolution**2, init_mode="kaiming_uniform", init_weight=1e-5)
        # A noise-dependent gain on the input, added to the output: F's optimum is nearly linear in x at every
        # sigma (the UNets pass x on through their skips; an MLP would have to carry it through every layer).
        self.gain = Linear(emb_channels, 1, init_mode="kaiming_uniform", init_weight=0.0) \
            if in_channels == out_channels else None

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        batch = x.shape[0]
        emb = self.map_noise(_noise_batch(noise_labels, batch, x.device))
        labels = _class_embedding_input(class_labels, self.label_dim, batch, self.training, self.label_dropout)
        emb = self.map_layer0(emb)
        if labels is not None:
            emb = emb + self.map_label(labels.to(emb.dtype) * math.sqrt(self.label_dim))
        emb = F.silu(self.map_layer1(F.silu(emb))).to(x.dtype)
        h = x.flatten(1)
        for layer in self.layers:
            h = layer(h, emb) if isinstance(layer, MLPBlock) else layer(h)
        out = self.head(F.silu(h)).reshape(batch, self.out_channels, self.img_resolution, self.img_resolution)
        return out if self.gain is None else out + self.gain(emb).reshape(batch, 1, 1, 1) * x


_ARCH_DEFAULTS: dict[str, tuple[type[nn.Module], dict]] = {
    "mlp": (MLPNet, {}),
    "ncsnpp": (SongUNet, {"embedding_type": "fourier", "channel_mult_noise": 2, "encoder_type": "residual",
                          "decoder_type": "standard", "resample_filter": (1, 3, 3, 1)}),
    "ddpmpp": (SongUNet, {"embedding_type": "positional", "channel_mult_noise": 1, "encoder_type": "standard",
                          "decoder_type": "standard", "resample_filter": (1, 1)}),
    "adm": (ADMUNet, {}),
}


def build_network(arch: str, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                  **kwargs) -> nn.Module:
    """Build a backbone: 'ncsnpp' / 'ddpmpp' (SongUNet with that family's defaults) or 'adm' (ADMUNet)."""
    if arch not in _ARCH_DEFAULTS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(_ARCH_DEFAULTS)}")
    cls, defaults = _ARCH_DEFAULTS[arch]
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "img_resolution", "in_channels",
                                                                  "out_channels", "label_dim"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"unknown keyword(s) {', '.join(map(repr, unknown))} for arch {arch!r}; "
                         f"allowed: {', '.join(sorted(allowed))}")
    return cls(img_resolution=img_resolution, in_channels=in_channels, out_channels=out_channels,
               label_dim=label_dim, **{**defaults, **kwargs})


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters (works on the 'meta' device)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
