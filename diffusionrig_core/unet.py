"""The denoiser: OpenAI's ADM UNet with DiffusionRig's two FiLM conditionings.

Module and parameter names follow the official code so its state dicts load key for key
(``time_embed``, ``input_blocks``, ``middle_block``, ``output_blocks``, ``out``; ResBlock leaves
``in_layers``, ``emb_layers``, ``cond_emb_layers``, ``out_layers``, ``skip_connection``; attention
leaves ``norm``, ``qkv``, ``proj_out``). Registration order matters: it is the state-dict order.

What DiffusionRig changes with respect to ADM (docs: OFFICIAL_SPEC 2.2-2.4):
* the input is ``cat([x_t, rendered, normal, albedo])`` (12 channels);
* every ResBlock also receives the global latent ``z`` through ``cond_emb_layers`` = SiLU -> Linear
  (SiLU on the *raw* latent), applied as a second FiLM right after the time FiLM.

The float32 path is the reference (parity with the official outputs). The attention blocks can
switch to ``torch.nn.functional.scaled_dot_product_attention`` (same maths, fused kernels) and the
whole network runs under bf16 autocast in the fast path (``fast.py``).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .fused import ChannelPair


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back, as the official ``normalization``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # .float() on the affine parameters too: a model cast to half precision still normalises in fp32.
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    # Always 32 groups: every width (decoder concatenations included) must be divisible by 32.
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cosines first, frequencies in float32 (bit-compatible with official)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class ResBlock(nn.Module):
    """ADM residual block with time FiLM then latent FiLM after the output GroupNorm.

    ``up``/``down`` blocks resample (nearest x2 / 2x2 average) between the input norm+SiLU and the
    first conv, and resample the skip path the same way; they keep the channel count.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        latent_dim: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = True,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.channels, self.out_channels = channels, out_channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.up, self.down = up, down
        self.fused = False  # fast path: fused.norm_affine_silu for both norms (fast.set_fused)
        self.recompute = True  # fused path: recompute the conv inputs in the backward (fast.set_fused)
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        # The official latent projection is always 2*out (which is why scale_shift=False crashes there).
        self.cond_emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(latent_dim, 2 * out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.up or self.down):
            return x
        from .fused import block_resample  # (fast on channels_last tensors)

        return block_resample(x, up=self.up)

    @property
    def _resampling(self) -> str | None:
        return "up" if self.up else "down" if self.down else None

    def forward(self, x: "torch.Tensor | ChannelPair", emb: "torch.Tensor | FiLMTable", z: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) and not self._reads_pairs():
            x = x.joined()  # (a decoder input left unconcatenated: see UNetModel._concat)
        if self._fused_path():
            return self._forward_fused(x, *(emb[self] if isinstance(emb, FiLMTable) else self.film(emb, z)))
        if self.up or self.down:
            norm, act, conv = self.in_layers
            h = conv(self._resample(act(norm(x))))
            x = self._resample(x)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype)[..., None, None]
        g = self.cond_emb_layers(z).to(h.dtype)[..., None, None]
        out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = out_norm(h) * (1 + scale) + shift
        else:
            # Kept for option completeness; the official code crashes below (2*out latent projection).
            h = out_norm(h + e)
        scale, shift = g.chunk(2, dim=1)
        h = h * (1 + scale) + shift
        h = out_rest(h)
        return self.skip_connection(x) + h

    def _fused_path(self) -> bool:
        return self.fused and self.use_scale_shift_norm

    def _reads_pairs(self) -> bool:
        # the fused block of a decoder level: its first norm and its skip convolution read both halves
        return self._fused_path() and not (self.up or self.down) and isinstance(self.skip_connection, nn.Conv2d)

    def film(self, emb: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The output norm's affine map and both FiLMs as one (B, C) scale and shift in float32:
        ``norm(h) * gamma + beta``, then ``* (1 + s_t) + b_t``, then ``* (1 + s_z) + b_z``."""
        s_t, b_t = self.emb_layers(emb).float().chunk(2, dim=1)
        s_z, b_z = self.cond_emb_layers(z).float().chunk(2, dim=1)
        norm = self.out_layers[0]
        return _fold_films(norm.weight, norm.bias, s_t, b_t, s_z, b_z)

    def _forward_fused(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """The same block with each norm, its FiLMs (``film``), the SiLU and dropout fused before the
        conv; the backward keeps only the norms' inputs (fused.py). The convolutions run without
        their biases: the first one's is folded into the second norm, the second one's (and the skip
        convolution's) is added together with the residual in one pass."""
        from .fused import bias_add, norm_affine_silu, norm_affine_silu_conv, skip_add  # (Triton: only when used)

        norm1, _, conv1 = self.in_layers
        # x comes back as a view for the residual: both its gradients are summed in one pass
        if self.up or self.down:  # (both resampled as the passes write h and read x)
            h, x = norm_affine_silu(x, norm1.num_groups, norm1.weight, norm1.bias, norm1.eps, passthrough=True,
                                    resample=self._resampling)
            h = F.conv2d(h, conv1.weight, padding=1)
        else:
            h, x = norm_affine_silu_conv(x, norm1.num_groups, norm1.weight, norm1.bias, conv1.weight, eps=norm1.eps,
                                         recompute=self.recompute, passthrough=True)
        norm2, _, dropout, conv2 = self.out_layers
        h = norm_affine_silu_conv(h, norm2.num_groups, scale, shift, conv2.weight, x_bias=conv1.bias,
                                  dropout=dropout.p if self.training else 0.0, eps=norm2.eps, recompute=self.recompute)
        if isinstance(self.skip_connection, nn.Conv2d):
            skip = self.skip_connection
            return skip_add(h, conv2.bias + skip.bias, self._resample(x), skip.weight)
        return bias_add(h, conv2.bias, x, resample=self._resampling)


def _fold_films(weight, bias, s_t, b_t, s_z, b_z) -> tuple[torch.Tensor, torch.Tensor]:
    return weight * (1 + s_t) * (1 + s_z), (bias * (1 + s_t) + b_t) * (1 + s_z) + b_z


class FiLMTable:
    """Every fused ResBlock's ``film`` for one call, from two matrix products for the whole network.

    Block by block the projections and the folding are ~16 small kernels a block, ~650 a call of the
    256 model, each a few microseconds: a visible share of a batch-1 call that takes ~4 ms (H100).
    Here the blocks' projection weights are concatenated, so one product gives all of them, and one
    gather reorders the columns [scale_0 shift_0 scale_1 ...] into [all scales | all shifts];
    ``table[block]`` is that block's (B, C) columns, read in place by the fused kernels.
    """

    def __init__(self, blocks: Sequence["ResBlock"], emb: torch.Tensor, z: torch.Tensor, order: torch.Tensor):
        widths = [b.out_channels for b in blocks]
        s_t, b_t = self._project([b.emb_layers[1] for b in blocks], emb, order)
        s_z, b_z = self._project([b.cond_emb_layers[1] for b in blocks], z, order)
        norms = [b.out_layers[0] for b in blocks]
        weight, bias = torch.cat([n.weight for n in norms]), torch.cat([n.bias for n in norms])
        scale, shift = _fold_films(weight, bias, s_t, b_t, s_z, b_z)
        self._index = {id(b): i for i, b in enumerate(blocks)}
        self._columns = list(zip(scale.split(widths, dim=1), shift.split(widths, dim=1)))

    @staticmethod
    def column_order(blocks: Sequence["ResBlock"]) -> torch.Tensor:
        """The gather from the concatenated projections to [all scales | all shifts]."""
        starts = torch.tensor([0] + [2 * b.out_channels for b in blocks]).cumsum(0)
        scales = [torch.arange(int(o), int(o) + b.out_channels) for o, b in zip(starts, blocks)]
        return torch.cat(scales + [s + b.out_channels for s, b in zip(scales, blocks)])

    @staticmethod
    def _project(linears: Sequence[nn.Linear], v: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = F.linear(F.silu(v), torch.cat([l.weight for l in linears]), torch.cat([l.bias for l in linears]))
        return out.float().index_select(1, order).chunk(2, dim=1)

    def __getitem__(self, block: "ResBlock") -> tuple[torch.Tensor, torch.Tensor]:
        return self._columns[self._index[id(block)]]


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual on the un-normalised input.

    ``legacy_order`` (official default): the 3c qkv channels are laid out per head as [q k v].
    Otherwise ("new" order) as [q | k | v], each then split into heads.
    ``use_sdpa`` computes the same attention with PyTorch's fused kernel (fast path).
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, legacy_order: bool = True):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"{channels} attention channels are not divisible by num_head_channels={num_head_channels}")
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"{channels} attention channels are not divisible by {self.num_heads} heads")
        self.channels = channels
        self.legacy_order = legacy_order
        self.use_sdpa = False
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_sdpa:
            return self._forward_sdpa(x)
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self._attention(self.qkv(self.norm(x)))
        return (x + self.proj_out(h)).reshape(b, c, *spatial)

    def _attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """Reference maths: q, k scaled by d^-1/4 each, softmax in float32."""
        bs, width, length = qkv.shape
        heads = self.num_heads
        d = width // (3 * heads)
        if self.legacy_order:
            q, k, v = qkv.reshape(bs * heads, 3 * d, length).split(d, dim=1)
        else:
            q, k, v = (u.reshape(bs * heads, d, length) for u in qkv.chunk(3, dim=1))
        scale = 1 / math.sqrt(math.sqrt(d))
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
        a = torch.einsum("bts,bcs->bct", weight, v)
        return a.reshape(bs, -1, length)

    def _forward_sdpa(self, x: torch.Tensor) -> torch.Tensor:
        # Work token-major (B, T, C): with channels_last inputs every reshape here is a view.
        b, c, hh, ww = x.shape
        heads, d = self.num_heads, c // self.num_heads
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, hh * ww, c)
        qkv = F.linear(tokens, self.qkv.weight[..., 0], self.qkv.bias)
        if self.legacy_order:
            qkv = qkv.view(b, hh * ww, heads, 3, d).permute(3, 0, 2, 1, 4)
        else:
            qkv = qkv.view(b, hh * ww, 3, heads, d).permute(2, 0, 3, 1, 4)
        if d <= 256:
            a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, T, d); scale 1/sqrt(d)
        else:
            # No flash kernel above 256 channels a head (the official default: one head of 512), and
            # the fallback kernel's backward took 0.3 ms a call on an H100; with few tokens the
            # plain products are faster. Softmax in float32, as the reference.
            w = torch.softmax((qkv[0] @ qkv[1].transpose(-1, -2)).float() * d ** -0.5, dim=-1)
            a = w.to(qkv.dtype) @ qkv[2]
        a = a.transpose(1, 2).reshape(b, hh * ww, c)
        out = F.linear(a, self.proj_out.weight[..., 0], self.proj_out.bias)
        return x + out.view(b, hh, ww, c).permute(0, 3, 1, 2)


class CondSequential(nn.Sequential):
    """A Sequential whose ResBlocks also receive the time embedding and the latent."""

    def forward(self, x: torch.Tensor, emb, z: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb, z) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNetModel(nn.Module):
    """ADM UNet conditioned on physical buffers (concatenated) and a global latent (FiLM)."""

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        latent_dim: int,
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = True,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        # attention_resolutions are downsample factors here (the config converts feature-map sizes).
        attention_ds = set(attention_resolutions)
        emb_dim = model_channels * 4
        legacy = not use_new_attention_order

        def resblock(ch: int, out: int | None = None, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(ch, emb_dim, latent_dim, dropout, out, use_scale_shift_norm, up=up, down=down)

        def attention(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch, heads, num_head_channels, legacy)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([CondSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [resblock(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_ds:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(CondSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                if not resblock_updown:
                    raise NotImplementedError("resblock_updown=False (conv resampling) is not supported")
                self.input_blocks.append(CondSequential(resblock(ch, ch, down=True)))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = CondSequential(resblock(ch), attention(ch, num_heads), resblock(ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                skip = skip_chans.pop()
                layers = [resblock(ch + skip, int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_ds:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(resblock(ch, ch, up=True))
                    ds //= 2
                self.output_blocks.append(CondSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(int(channel_mult[0] * model_channels), out_channels, 3, padding=1))
        )
        self.fused = False  # fast path: the output norm + SiLU as one pass (fast.set_fused)
        self.recompute = True

    def _film_blocks(self) -> list[ResBlock]:
        return [m for m in self.modules() if isinstance(m, ResBlock) and m.fused and m.use_scale_shift_norm]

    def _film_table(self, emb: torch.Tensor, latent: torch.Tensor) -> FiLMTable:
        blocks = self._film_blocks()
        # The column order lives on the device, made once (and before any CUDA-graph capture: the
        # first calls run eagerly) per device and set of block widths.
        cache = self.__dict__.setdefault("_film_orders", {})
        key = (emb.device, tuple(b.out_channels for b in blocks))
        if key not in cache:
            cache[key] = FiLMTable.column_order(blocks).to(emb.device)
        return FiLMTable(blocks, emb, latent, cache[key])

    def _concat(self, h: torch.Tensor, skip: torch.Tensor) -> "torch.Tensor | ChannelPair":
        if self.fused:  # (its gradients come back as two tensors, not two slices of one)
            from .fused import ChannelPair, concat_channels

            # in inference the decoder block reads the two halves where they are
            return ChannelPair(h, skip) if ChannelPair.possible(h, skip) else concat_channels(h, skip)
        return torch.cat([h, skip], dim=1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, buffers: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """x (B,3,H,W), integer timesteps (B,), buffers (B,9,H,W), latent (B,latent_dim) -> (B,out,H,W)."""
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        dtype = self.time_embed[0].weight.dtype  # lets a model cast to half precision run without autocast
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        latent = latent.to(dtype)
        if self.fused:
            from .fused import input_conv

            emb = self._film_table(emb, latent)
            conv = self.input_blocks[0][0]
            h = input_conv(x, buffers, conv.weight, conv.bias)
            skips, blocks = [h], self.input_blocks[1:]
        else:
            h = torch.cat([x, buffers], dim=1).to(dtype)
            skips, blocks = [], self.input_blocks
        for block in blocks:
            h = block(h, emb, latent)
            skips.append(h)
        h = self.middle_block(h, emb, latent)
        for block in self.output_blocks:
            h = block(self._concat(h, skips.pop()), emb, latent)
        if self.fused:
            from .fused import norm_affine_silu_conv

            norm, conv = self.out[0], self.out[2]
            return norm_affine_silu_conv(h, norm.num_groups, norm.weight, norm.bias, conv.weight, conv.bias,
                                         eps=norm.eps, recompute=self.recompute).to(x.dtype)
        return self.out(h).to(x.dtype)
