"""GroupNorm, per-sample affine and SiLU in one pass: the fast path's answer to a memory-bound UNet.

Every ADM ResBlock normalises twice: ``SiLU(GroupNorm(x))`` on its input and, on its inner
activation, ``SiLU(FiLM_latent(FiLM_time(GroupNorm(h))))``. Eager PyTorch spends about eight full
passes over the activation on that (a float32 copy, the statistics, the normalisation, a cast back,
two multiply-adds, the SiLU), and at 256 x 256 those passes cost more GPU time than the
convolutions (H100, batch 4: 41 ms of elementwise kernels against 27 ms of convolutions per training
step). All of it is one affine map per (sample, channel) after the normalisation, so

    y = SiLU(x_hat * A[b, c] + C[b, c]),   x_hat = (x - mean_g) / sqrt(var_g + eps)

with ``A = gamma (1 + s_time)(1 + s_latent)`` and ``C = (beta (1 + s_time) + t_time)(1 + s_latent) + t_latent``
is computed here in two passes forward (channel sums, then the map) and two backward, in float32
inside the kernels, reading bfloat16 and writing the input's dtype. Gradients reach A and C (and
through them the norm's weight and bias and both FiLM projections) by ordinary autograd on the
small (B, C) tensors.

The convolutions around the norms run without their biases: the bias of the convolution before a
norm is folded into its statistics (the sums of x + beta follow from those of x) and its affine map,
and the bias after the block's last convolution is added together with the residual in one pass
(``bias_add``); PyTorch would add each bias to a channels_last activation in a strided pass of its
own. A block's input can pass through its first norm (``passthrough``) so that the residual's
gradient is summed inside the norm's backward pass instead of in one more.

Around the norms, three more memory-bound steps of the UNet's fast path are single tiled passes
here: the decoder's skip concatenation (``concat_channels``, whose gradients come back as two whole
tensors rather than two strided slices), the 2x resampling of the up/down blocks (``resample2x``), and
the dropout keep mask (``dropout_mask``), drawn before the norm's pass and applied inside it.
The residual add and the concatenation also leave the channel sums of what they write with it, so
the norm that reads it next skips its statistics pass; the UNet's first convolution runs on its
inputs stacked to 16 channels with the bias in a channel of ones (``input_conv``). The up/down
blocks' norm writes its output already resampled and their residual add reads the skip path
resampled (``resample=``). In inference the decoder's concatenation is not written at all
(``ChannelPair``): its block's first norm reads both halves, and its 1x1 skip convolution, bias,
residual add and channel sums are one pass (``skip_add``).

Works in NCHW and channels_last alike: only per-channel sums are reduced on the big tensor, the
groups are combined on the (B, C) sums. On CUDA the four passes are Triton kernels; elsewhere (the
CPU, tests) the same maths runs in PyTorch, so the backward formula is checked against autograd on
any machine (``tests/test_fused.py``).
"""
from __future__ import annotations

import contextlib
from functools import lru_cache
from typing import Iterator

import torch
import torch.nn.functional as F

__all__ = ["ChannelPair", "bias_add", "block_resample", "concat_channels", "dropout_mask", "input_conv", "norm_affine_silu",
           "norm_affine_silu_conv", "resample2x", "search_convolutions_from", "skip_add", "triton_available"]

try:  # Triton ships with CUDA builds of PyTorch; CPU builds run the PyTorch fallback.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installed PyTorch
    triton = None


def triton_available() -> bool:
    """Triton is installed and the GPU can run its kernels (compute capability 7.0 or newer)."""
    return triton is not None and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (7, 0)


@lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# ---------------------------------------------------------------------------------------------
# PyTorch versions of the passes (the reference; CPU)
# ---------------------------------------------------------------------------------------------
def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(*v.shape, *([1] * (x.ndim - 2)))


def _silu_grad(z: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    sig = torch.sigmoid(z)
    return dy * sig * (1 + z * (1 - sig))


def _coefficients_torch(x, A, C, beta, groups: int, eps: float):
    B, ch = x.shape[:2]
    rep = ch // groups
    xf = x.float().flatten(2)
    hw = xf.shape[-1]
    s1, s2 = xf.sum(-1), (xf * xf).sum(-1)
    if beta is not None:  # the statistics of x + beta from those of x
        s1, s2, raw = s1 + hw * beta, s2 + 2 * beta * s1 + hw * beta * beta, s1
    mean = s1.view(B, groups, rep).sum(-1) / (rep * hw)
    var = (s2.view(B, groups, rep).sum(-1) / (rep * hw) - mean * mean).clamp_min(0)
    rstd = torch.rsqrt(var + eps)
    a = A * rstd.repeat_interleave(rep, dim=1)
    c = C - _channel_mean(mean, beta, rep) * a
    return a, c, mean, rstd, (raw if beta is not None else None)


def _channel_mean(mean: torch.Tensor, beta, rep: int) -> torch.Tensor:
    """Each channel's group mean in the coordinates of the raw x (x + beta is what is normalised)."""
    m = mean.repeat_interleave(rep, dim=1)
    return m if beta is None else m - beta


def _apply_torch(x, a, c, mask=None, scale: float = 1.0):
    y = F.silu(x.float() * _bcast(a, x) + _bcast(c, x))
    if mask is not None:
        y = y * mask * scale
    return y.to(x.dtype)


def _backward_torch(x, dy, A, a, c, mean, rstd, beta, groups: int, mask=None, scale: float = 1.0, extra=None):
    B, ch = x.shape[:2]
    rep = ch // groups
    xf, dyf = x.float(), dy.float()
    if mask is not None:
        dyf = dyf * mask * scale
    dz = _silu_grad(xf * _bcast(a, x) + _bcast(c, x), dyf)
    n = rep * xf[0, 0].numel()
    sdz, sdzx = dz.flatten(2).sum(-1), (dz * xf).flatten(2).sum(-1)
    mean_c, rstd_c = _channel_mean(mean, beta, rep), rstd.repeat_interleave(rep, dim=1)
    dC = sdz                                      # sum over the pixels of dz
    dA = rstd_c * (sdzx - mean_c * sdz)           # sum of dz * x_hat
    g1 = (A * dC).view(B, groups, rep).sum(-1)    # sum over the group of d x_hat
    g2 = (A * dA).view(B, groups, rep).sum(-1)    # sum over the group of d x_hat * x_hat
    # dx = rstd (A dz - g1 / n - x_hat g2 / n) = a dz + u x + v, per (b, c)
    u = (-(rstd * rstd) * g2 / n).repeat_interleave(rep, dim=1)
    v = mean_c * (rstd * rstd * g2 / n).repeat_interleave(rep, dim=1) - (rstd * g1 / n).repeat_interleave(rep, dim=1)
    dx = dz * _bcast(a, x) + xf * _bcast(u, x) + _bcast(v, x)
    if extra is not None:
        dx = dx + extra.float()
    return dx.to(x.dtype), dA, dC, u, v


# ---------------------------------------------------------------------------------------------
# Triton versions (CUDA): partial channel sums, per-group coefficients, one elementwise pass
# ---------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _silu_and_grad(z):
        sig = 1.0 / (1.0 + tl.exp(-z))
        return z * sig, sig * (1.0 + z * (1.0 - sig))

    @triton.jit
    def _sums_kernel(x_ptr, dy_ptr, a_ptr, c_ptr, mask_ptr, out1_ptr, out2_ptr, C, HW, s_b, s_c, s_hw, chunk, scale,
                     BACKWARD: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
                     STAGES: tl.constexpr):
        # Program (b, channel block, hw chunk): per-channel partial sums over its chunk.
        # Forward: sum x and sum x^2; backward: sum dz and sum dz * x (dz = dy * SiLU'(a x + c)).
        # The loop's loads are software-pipelined (STAGES): one tile in flight per program left
        # these passes at 2.2-2.4 TB/s on an H100, against 2.8-2.9 pipelined.
        b = tl.program_id(0)
        cb = tl.program_id(1)
        k = tl.program_id(2)
        n_chunks = tl.num_programs(2)
        ch = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = ch < C
        base = b.to(tl.int64) * s_b
        if BACKWARD:
            a = tl.load(a_ptr + b * C + ch, mask=cmask, other=0.0)[None, :]
            c = tl.load(c_ptr + b * C + ch, mask=cmask, other=0.0)[None, :]
        acc1 = tl.zeros((BLOCK_HW, BLOCK_C), tl.float32)
        acc2 = tl.zeros((BLOCK_HW, BLOCK_C), tl.float32)
        for i in tl.range(0, chunk, BLOCK_HW, num_stages=STAGES):
            hw = k * chunk + i + tl.arange(0, BLOCK_HW)
            m = (hw < HW)[:, None] & cmask[None, :]
            idx = base + hw[:, None].to(tl.int64) * s_hw + ch[None, :].to(tl.int64) * s_c
            x = tl.load(x_ptr + idx, mask=m, other=0.0).to(tl.float32)
            if BACKWARD:
                dy = tl.load(dy_ptr + idx, mask=m, other=0.0).to(tl.float32)
                if HAS_MASK:
                    dy = dy * tl.load(mask_ptr + idx, mask=m, other=0).to(tl.float32) * scale
                _, g = _silu_and_grad(x * a + c)
                dz = tl.where(m, dy * g, 0.0)
                acc1 += dz
                acc2 += dz * x
            else:
                acc1 += x
                acc2 += x * x
        out = (b * n_chunks + k) * C + ch
        tl.store(out1_ptr + out, tl.sum(acc1, axis=0), mask=cmask)
        tl.store(out2_ptr + out, tl.sum(acc2, axis=0), mask=cmask)

    @triton.jit
    def _group_sums(p1_ptr, p2_ptr, b, g, C, n_chunks, cpg, BLOCK_K: tl.constexpr, BLOCK_CPG: tl.constexpr):
        # Sample b, group g: its channels and their two partial sums reduced over the chunks.
        j = tl.arange(0, BLOCK_CPG)
        cm = j < cpg
        ch = g * cpg + j
        s1 = tl.zeros((BLOCK_CPG,), tl.float32)
        s2 = tl.zeros((BLOCK_CPG,), tl.float32)
        for k0 in range(0, n_chunks, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            m = (k < n_chunks)[:, None] & cm[None, :]
            idx = (b * n_chunks + k)[:, None] * C + ch[None, :]
            s1 += tl.sum(tl.load(p1_ptr + idx, mask=m, other=0.0), axis=0)
            s2 += tl.sum(tl.load(p2_ptr + idx, mask=m, other=0.0), axis=0)
        return ch, cm, s1, s2

    @triton.jit
    def _coef_kernel(p1_ptr, p2_ptr, A_ptr, C_ptr, beta_ptr, a_ptr, c_ptr, mean_ptr, rstd_ptr, raw_ptr, C, sA, n_chunks,
                     cpg, hw, eps, HAS_BETA: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CPG: tl.constexpr):
        # Program (b, group): the group's mean and 1/std, then a = A / std, c = C - mean a per channel.
        # With an input bias beta the statistics are those of x + beta, from the sums of x.
        b = tl.program_id(0)
        g = tl.program_id(1)
        ch, cm, s1, s2 = _group_sums(p1_ptr, p2_ptr, b, g, C, n_chunks, cpg, BLOCK_K, BLOCK_CPG)
        beta = tl.zeros((BLOCK_CPG,), tl.float32)
        if HAS_BETA:
            beta = tl.load(beta_ptr + ch, mask=cm, other=0.0)
            tl.store(raw_ptr + b * C + ch, s1, mask=cm)
            s2 = s2 + 2.0 * beta * s1 + hw * beta * beta
            s1 = s1 + hw * beta
        n = hw * cpg
        mean = tl.sum(s1, axis=0) / n
        var = tl.maximum(tl.sum(s2, axis=0) / n - mean * mean, 0.0)
        rstd = 1.0 / tl.sqrt(var + eps)
        a = tl.load(A_ptr + b * sA + ch, mask=cm, other=0.0) * rstd
        tl.store(a_ptr + b * C + ch, a, mask=cm)
        tl.store(c_ptr + b * C + ch, tl.load(C_ptr + b * sA + ch, mask=cm, other=0.0) - (mean - beta) * a, mask=cm)
        tl.store(mean_ptr + b * tl.num_programs(1) + g, mean)
        tl.store(rstd_ptr + b * tl.num_programs(1) + g, rstd)

    @triton.jit
    def _bwd_coef_kernel(p1_ptr, p2_ptr, A_ptr, beta_ptr, raw_ptr, a_ptr, mean_ptr, rstd_ptr, dA_ptr, dC_ptr, u_ptr,
                         v_ptr, dbeta_ptr, B, C, sA, n_chunks, cpg, hw, HAS_BETA: tl.constexpr,
                         PER_CHANNEL: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CPG: tl.constexpr):
        # Program (group), looping over the batch: the u, v of dx = a dz + u x + v per (b, channel)
        # (_backward_torch), dA and dC per (b, channel) or, for per-channel A and C, summed over the
        # batch here, and the input bias's gradient (the sum of dx over pixels and batch). Summing
        # in the program saves the ~6 small kernels a call those sums took (~450 a training step).
        g = tl.program_id(0)
        G = tl.num_programs(0)
        n = hw * cpg
        acc_a = tl.zeros((BLOCK_CPG,), tl.float32)
        acc_c = tl.zeros((BLOCK_CPG,), tl.float32)
        acc_beta = tl.zeros((BLOCK_CPG,), tl.float32)
        for b in range(0, B):
            ch, cm, sdz, sdzx = _group_sums(p1_ptr, p2_ptr, b, g, C, n_chunks, cpg, BLOCK_K, BLOCK_CPG)
            rstd = tl.load(rstd_ptr + b * G + g)
            mean_c = tl.load(mean_ptr + b * G + g) + tl.zeros((BLOCK_CPG,), tl.float32)
            if HAS_BETA:
                mean_c = mean_c - tl.load(beta_ptr + ch, mask=cm, other=0.0)
            A = tl.load(A_ptr + b * sA + ch, mask=cm, other=0.0)
            dA = rstd * (sdzx - mean_c * sdz)
            g1 = tl.sum(A * sdz, axis=0)
            g2 = tl.sum(A * dA, axis=0)
            u = -(rstd * rstd) * g2 / n + 0.0 * A
            v = mean_c * (rstd * rstd * g2 / n) - rstd * g1 / n
            tl.store(u_ptr + b * C + ch, u, mask=cm)
            tl.store(v_ptr + b * C + ch, v, mask=cm)
            if PER_CHANNEL:
                acc_a += dA
                acc_c += sdz
            else:
                tl.store(dA_ptr + b * C + ch, dA, mask=cm)
                tl.store(dC_ptr + b * C + ch, sdz, mask=cm)
            if HAS_BETA:
                a = tl.load(a_ptr + b * C + ch, mask=cm, other=0.0)
                acc_beta += a * sdz + u * tl.load(raw_ptr + b * C + ch, mask=cm, other=0.0) + hw * v
        ch = g * cpg + tl.arange(0, BLOCK_CPG)
        cm = tl.arange(0, BLOCK_CPG) < cpg
        if PER_CHANNEL:
            tl.store(dA_ptr + ch, acc_a, mask=cm)
            tl.store(dC_ptr + ch, acc_c, mask=cm)
        if HAS_BETA:
            tl.store(dbeta_ptr + ch, acc_beta, mask=cm)

    @triton.jit
    def _source_pixel(p, W, UP: tl.constexpr):
        # Output pixel p (flat over the batch) of a 2x resampling to width W: UP, the pixel it copies;
        # else the top left of the 2 x 2 window it averages (the others: +1, +2W, +2W + 1).
        if UP:
            return (p // W) // 2 * (W // 2) + (p % W) // 2
        else:
            return (p // W) * 4 * W + 2 * (p % W)

    @triton.jit
    def _apply_kernel(x_ptr, x2_ptr, dy_ptr, a_ptr, c_ptr, u_ptr, v_ptr, mask_ptr, e_ptr, y_ptr, n, C, C1, HW, W,
                      scale, CHANNELS_LAST: tl.constexpr, PAIR: tl.constexpr, RESAMPLE: tl.constexpr,
                      BACKWARD: tl.constexpr, HAS_MASK: tl.constexpr, HAS_EXTRA: tl.constexpr, BLOCK: tl.constexpr):
        # Elementwise over the flat tensor; the (b, c) coefficients are gathered from small tables.
        # Forward: y = SiLU(a x + c) (times the dropout mask); backward: dx = a dz + u x + v (+ e, a
        # gradient of x from elsewhere). PAIR: x is the channel concatenation of two channels_last
        # tensors of C1 and C - C1 channels (a ChannelPair), read where they lie. RESAMPLE (forward,
        # channels_last): y is resampled 2x to (HW, width W): 1 up (nearest), 2 down (2 x 2 mean).
        off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = off < n
        if CHANNELS_LAST:
            bc = (off // (HW * C)) * C + off % C
        else:
            bc = off // HW
        a = tl.load(a_ptr + bc, mask=m, other=0.0)
        c = tl.load(c_ptr + bc, mask=m, other=0.0)
        if RESAMPLE == 2:
            src = _source_pixel(off // C, W, False) * C + off % C
            y = tl.zeros((BLOCK,), tl.float32)
            for j in tl.static_range(4):
                x = tl.load(x_ptr + src + (j % 2) * C + (j // 2) * 2 * W * C, mask=m, other=0.0).to(tl.float32)
                y += _silu_and_grad(x * a + c)[0]
            y = 0.25 * y
        else:
            if PAIR:
                ch, pixel = off % C, off // C
                x = tl.load(x_ptr + pixel * C1 + ch, mask=m & (ch < C1), other=0.0).to(tl.float32)
                x += tl.load(x2_ptr + pixel * (C - C1) + (ch - C1), mask=m & (ch >= C1), other=0.0).to(tl.float32)
            elif RESAMPLE == 1:
                x = tl.load(x_ptr + _source_pixel(off // C, W, True) * C + off % C, mask=m, other=0.0).to(tl.float32)
            else:
                x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
            y, g = _silu_and_grad(x * a + c)
        if HAS_MASK:
            keep = tl.load(mask_ptr + off, mask=m, other=0).to(tl.float32) * scale
        if BACKWARD:
            dy = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32)
            if HAS_MASK:
                dy = dy * keep
            u = tl.load(u_ptr + bc, mask=m, other=0.0)
            v = tl.load(v_ptr + bc, mask=m, other=0.0)
            y = dy * g * a + x * u + v
            if HAS_EXTRA:
                y += tl.load(e_ptr + off, mask=m, other=0.0).to(tl.float32)
        elif HAS_MASK:
            y = y * keep
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _bias_add_kernel(h_ptr, r_ptr, bias_ptr, y_ptr, n, C, HW, CHANNELS_LAST: tl.constexpr,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        # y = h + bias[c] (+ r), summed in float32 and rounded once.
        off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = off < n
        ch = off % C if CHANNELS_LAST else (off // HW) % C
        y = tl.load(h_ptr + off, mask=m, other=0.0).to(tl.float32) + tl.load(bias_ptr + ch, mask=m, other=0.0)
        if HAS_RESIDUAL:
            y += tl.load(r_ptr + off, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _bias_add_sums_kernel(h_ptr, r_ptr, bias_ptr, y_ptr, out1_ptr, out2_ptr, C, HW, W, chunk,
                              HAS_RESIDUAL: tl.constexpr, RESAMPLE: tl.constexpr, BLOCK_C: tl.constexpr,
                              BLOCK_HW: tl.constexpr, STAGES: tl.constexpr):
        # channels_last: _bias_add_kernel's y, tiled as _sums_kernel, with the partial channel sums
        # of y (as rounded) for the norm that reads y next. RESAMPLE: the residual is read 2x
        # resampled to y's size (width W; 1 up, 2 down, as _apply_kernel).
        b = tl.program_id(0)
        ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        k = tl.program_id(2)
        cmask = ch < C
        bias = tl.load(bias_ptr + ch, mask=cmask, other=0.0)[None, :]
        base = b.to(tl.int64) * HW * C
        acc1 = tl.zeros((BLOCK_HW, BLOCK_C), tl.float32)
        acc2 = tl.zeros((BLOCK_HW, BLOCK_C), tl.float32)
        for i in tl.range(0, chunk, BLOCK_HW, num_stages=STAGES):  # (as _sums_kernel)
            hw = k * chunk + i + tl.arange(0, BLOCK_HW)
            m = (hw < HW)[:, None] & cmask[None, :]
            idx = base + hw[:, None].to(tl.int64) * C + ch[None, :]
            y = tl.load(h_ptr + idx, mask=m, other=0.0).to(tl.float32) + bias
            if RESAMPLE == 0 and HAS_RESIDUAL:
                y += tl.load(r_ptr + idx, mask=m, other=0.0).to(tl.float32)
            elif RESAMPLE > 0:
                src = _source_pixel(b * HW + hw, W, RESAMPLE == 1).to(tl.int64)[:, None] * C + ch[None, :]
                if RESAMPLE == 1:
                    y += tl.load(r_ptr + src, mask=m, other=0.0).to(tl.float32)
                else:
                    r = tl.zeros((BLOCK_HW, BLOCK_C), tl.float32)
                    for j in tl.static_range(4):
                        r += tl.load(r_ptr + src + (j % 2) * C + (j // 2) * 2 * W * C, mask=m, other=0.0).to(tl.float32)
                    y += 0.25 * r
            y = y.to(y_ptr.dtype.element_ty)
            tl.store(y_ptr + idx, y, mask=m)
            y = tl.where(m, y.to(tl.float32), 0.0)
            acc1 += y
            acc2 += y * y
        out = (b * tl.num_programs(2) + k) * C + ch
        tl.store(out1_ptr + out, tl.sum(acc1, axis=0), mask=cmask)
        tl.store(out2_ptr + out, tl.sum(acc2, axis=0), mask=cmask)

    @triton.jit
    def _skip_add_kernel(a_ptr, s_ptr, w_ptr, h_ptr, bias_ptr, y_ptr, out1_ptr, out2_ptr, CA, CS, N,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                         STAGES: tl.constexpr, PRECISION: tl.constexpr):
        # y = h + bias + [a | s] @ w over channels_last pixel rows: a residual block's output with its
        # 1x1 skip convolution over a ChannelPair, in float32 and rounded once, and the partial
        # channel sums of y (as rounded) for the next norm. w is the (N, CA + CS) weight. A row block (BLOCK_M
        # pixels) never straddles two images, so program row i is sums chunk i (and needs no mask).
        pid_m = tl.program_id(0)
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k in tl.range(0, CA, BLOCK_K, num_stages=STAGES):
            kk = k + tl.arange(0, BLOCK_K)
            kmask = (kk < CA) | EVEN_K
            x = tl.load(a_ptr + rows[:, None] * CA + kk[None, :], mask=kmask[None, :], other=0.0)
            w = tl.load(w_ptr + cols[None, :] * (CA + CS) + kk[:, None], mask=kmask[:, None] & nmask[None, :],
                        other=0.0)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        for k in tl.range(0, CS, BLOCK_K, num_stages=STAGES):
            kk = k + tl.arange(0, BLOCK_K)
            kmask = (kk < CS) | EVEN_K
            x = tl.load(s_ptr + rows[:, None] * CS + kk[None, :], mask=kmask[None, :], other=0.0)
            w = tl.load(w_ptr + cols[None, :] * (CA + CS) + CA + kk[:, None], mask=kmask[:, None] & nmask[None, :],
                        other=0.0)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        idx = rows[:, None] * N + cols[None, :]
        y = acc + tl.load(h_ptr + idx, mask=nmask[None, :], other=0.0).to(tl.float32)
        y += tl.load(bias_ptr + cols, mask=nmask, other=0.0)[None, :]
        y = y.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + idx, y, mask=nmask[None, :])
        y = tl.where(nmask[None, :], y.to(tl.float32), 0.0)
        tl.store(out1_ptr + pid_m * N + cols, tl.sum(y, axis=0), mask=nmask)
        tl.store(out2_ptr + pid_m * N + cols, tl.sum(y * y, axis=0), mask=nmask)

    @triton.jit
    def _join_sums_kernel(a1_ptr, a2_ptr, b1_ptr, b2_ptr, out1_ptr, out2_ptr, CA, CB, chunks_a, chunks_b,
                          BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
        # The channel sums of a concatenation from its halves' partial sums: (B, 1, CA + CB) out of
        # (B, chunks_a, CA) and (B, chunks_b, CB), both sums in one launch, BLOCK_K chunks a step.
        b = tl.program_id(0)
        ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        in_a = ch < CA
        in_b = (ch >= CA) & (ch < CA + CB)
        s1 = tl.zeros((BLOCK_K, BLOCK_C), tl.float32)
        s2 = tl.zeros((BLOCK_K, BLOCK_C), tl.float32)
        for k0 in range(0, chunks_a, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            m = (k < chunks_a)[:, None] & in_a[None, :]
            idx = (b * chunks_a + k)[:, None] * CA + ch[None, :]
            s1 += tl.load(a1_ptr + idx, mask=m, other=0.0)
            s2 += tl.load(a2_ptr + idx, mask=m, other=0.0)
        for k0 in range(0, chunks_b, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            m = (k < chunks_b)[:, None] & in_b[None, :]
            idx = (b * chunks_b + k)[:, None] * CB + (ch - CA)[None, :]
            s1 += tl.load(b1_ptr + idx, mask=m, other=0.0)
            s2 += tl.load(b2_ptr + idx, mask=m, other=0.0)
        out = b * (CA + CB) + ch
        tl.store(out1_ptr + out, tl.sum(s1, axis=0), mask=in_a | in_b)
        tl.store(out2_ptr + out, tl.sum(s2, axis=0), mask=in_a | in_b)

    @triton.jit
    def _copy_rows_kernel(src_ptr, dst_ptr, rows, cols, s_src, s_dst, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # dst[r, :cols] = src[r, :cols] for two row-major matrices with their own row strides.
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        col = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        m = (r < rows)[:, None] & (col < cols)[None, :]
        v = tl.load(src_ptr + r[:, None] * s_src + col[None, :], mask=m)
        tl.store(dst_ptr + r[:, None] * s_dst + col[None, :], v, mask=m)

    @triton.jit
    def _stack_kernel(a_ptr, b_ptr, out_ptr, n, HW, sa_b, sa_c, sa_hw, sb_b, sb_c, sb_hw, CA: tl.constexpr,
                      CB: tl.constexpr, COUT: tl.constexpr, BLOCK: tl.constexpr):
        # channels_last out (n pixels, COUT): a's CA channels, b's CB, a channel of ones, zeros.
        p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        c = tl.arange(0, COUT)
        pm = (p < n)[:, None]
        bi, hw = (p // HW)[:, None], (p % HW)[:, None]
        in_a = (c < CA)[None, :]
        in_b = ((c >= CA) & (c < CA + CB))[None, :]
        v = tl.load(a_ptr + bi * sa_b + c[None, :] * sa_c + hw * sa_hw, mask=pm & in_a, other=0.0).to(tl.float32)
        v += tl.load(b_ptr + bi * sb_b + (c[None, :] - CA) * sb_c + hw * sb_hw, mask=pm & in_b, other=0.0).to(tl.float32)
        v += tl.where(c == CA + CB, 1.0, 0.0)[None, :]
        tl.store(out_ptr + p[:, None] * COUT + c[None, :], v.to(out_ptr.dtype.element_ty), mask=pm)

    @triton.jit
    def _resample_kernel(src_ptr, dst_ptr, n, C, W, scale, UP: tl.constexpr, BLOCK: tl.constexpr):
        # channels_last dst (B, H, W, C), each element scale times: UP, its 2 x 2 window's value in
        # src (B, H/2, W/2, C); else the sum of its 2 x 2 window in src (B, 2H, 2W, C), in float32.
        off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = off < n
        c = off % C
        src = _source_pixel(off // C, W, UP) * C + c
        if UP:
            v = tl.load(src_ptr + src, mask=m, other=0.0).to(tl.float32)
        else:
            row = 2 * W * C
            v = tl.load(src_ptr + src, mask=m, other=0.0).to(tl.float32)
            v += tl.load(src_ptr + src + C, mask=m, other=0.0).to(tl.float32)
            v += tl.load(src_ptr + src + row, mask=m, other=0.0).to(tl.float32)
            v += tl.load(src_ptr + src + row + C, mask=m, other=0.0).to(tl.float32)
        tl.store(dst_ptr + off, (v * scale).to(dst_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _keep_mask_kernel(seed_ptr, out_ptr, n, threshold, CALLS: tl.constexpr):
        # Four masks per Philox call (one 32-bit draw each, as PyTorch's own dropout): a program
        # writes 4 runs of CALLS elements; element = 4 CALLS program + CALLS k + j.
        i = tl.program_id(0).to(tl.int64) * CALLS + tl.arange(0, CALLS)
        r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr), i)
        base = tl.program_id(0).to(tl.int64) * 4 * CALLS + tl.arange(0, CALLS)
        tl.store(out_ptr + base, r0.to(tl.int64) >= threshold, mask=base < n)
        tl.store(out_ptr + base + CALLS, r1.to(tl.int64) >= threshold, mask=base + CALLS < n)
        tl.store(out_ptr + base + 2 * CALLS, r2.to(tl.int64) >= threshold, mask=base + 2 * CALLS < n)
        tl.store(out_ptr + base + 3 * CALLS, r3.to(tl.int64) >= threshold, mask=base + 3 * CALLS < n)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _partial_sums(x, dy=None, a=None, c=None, mask=None, scale: float = 1.0):
    """(B, chunks, C) float32 partial sums of x and x^2, or (backward) of dz and dz x."""
    B, C = x.shape[:2]
    HW = x[0, 0].numel()
    cl = _is_channels_last(x)
    s_b, s_c, s_hw = (HW * C, 1, C) if cl else (HW * C, HW, 1)
    grid, out1, out2, chunk, tiles = _sums_grid(x, cl)
    backward = dy is not None
    _sums_kernel[grid](
        x, dy if backward else x, a if backward else out1, c if backward else out1, x if mask is None else mask,
        out1, out2, C, HW, s_b, s_c, s_hw, chunk, scale, BACKWARD=backward, HAS_MASK=mask is not None, **tiles)
    return out1, out2


def _sums_grid(x: torch.Tensor, channels_last: bool, max_c: int = 64, block_hw: int = 32, per_sm: int = 4,
               stages: int = 3):
    """The grid, the two (B, chunks, C) outputs and the tiling of a partial-sums kernel over x:
    ``max_c`` x ``block_hw`` tiles (4 x 256 in NCHW), ``per_sm`` programs a multiprocessor, loads
    pipelined over ``stages`` (the defaults: the fastest for the sums alone on an H100)."""
    B, C = x.shape[:2]
    HW = x[0, 0].numel()
    block_c = min(max_c, triton.next_power_of_2(C)) if channels_last else 4
    block_hw = block_hw if channels_last else 256
    c_blocks = triton.cdiv(C, block_c)
    # enough programs to fill the GPU several times over; each chunk a multiple of the tile
    want = max(1, (per_sm * _multiprocessors(x.device.index or 0)) // (B * c_blocks))
    chunk = triton.cdiv(triton.cdiv(HW, want), block_hw) * block_hw
    n_chunks = triton.cdiv(HW, chunk)
    out1 = torch.empty((B, n_chunks, C), device=x.device, dtype=torch.float32)
    tiles = dict(BLOCK_C=block_c, BLOCK_HW=block_hw, STAGES=stages, num_warps=4)
    return (B, c_blocks, n_chunks), out1, torch.empty_like(out1), chunk, tiles


def _remember_sums(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """Keep x's partial channel sums with it, for the norm that reads x next (``_known_sums``)."""
    x._fused_sums = (x._version, p1, p2)
    return x


def _known_sums(x: torch.Tensor):
    """The partial sums a kernel that wrote x left with it, unless x was changed since."""
    kept = getattr(x, "_fused_sums", None)
    return kept[1:] if kept is not None and kept[0] == x._version else None


def _group_blocks(p1: torch.Tensor, cpg: int) -> dict:
    # Few fixed tile sizes (the kernels loop and mask): each distinct size is one more compilation
    # on first use, and sizes fitted to every (chunks, channels per group) pair of a UNet made
    # dozens of them. These kernels work on (B, C) sums, a few microseconds a call either way.
    return dict(BLOCK_K=32, BLOCK_CPG=max(16, triton.next_power_of_2(cpg)))


def _small(x: torch.Tensor, *like: int) -> torch.Tensor:
    return torch.empty(like, device=x.device, dtype=torch.float32)


def _coefficients_triton(x, A, C, beta, groups: int, eps: float):
    B, ch = x.shape[:2]
    cpg = ch // groups
    p1, p2 = x.sums() if isinstance(x, ChannelPair) else _known_sums(x) or _partial_sums(x)
    a, c = _small(x, B, ch), _small(x, B, ch)
    mean, rstd = _small(x, B, groups), _small(x, B, groups)
    raw = _small(x, B, ch) if beta is not None else None
    _coef_kernel[(B, groups)](p1, p2, A, C, a if beta is None else beta, a, c, mean, rstd, a if raw is None else raw,
                              ch, A.stride(0), p1.shape[1], cpg, float(x.shape[2:].numel()), eps, HAS_BETA=beta is not None,
                              **_group_blocks(p1, cpg), num_warps=1)
    return a, c, mean, rstd, raw


_RESAMPLE_CODES = {None: 0, "up": 1, "down": 2}  # the kernels' RESAMPLE


def _resampled_shape(x, resample: str | None) -> tuple[int, ...]:
    B, C, H, W = x.shape
    return {None: (B, C, H, W), "up": (B, C, 2 * H, 2 * W), "down": (B, C, H // 2, W // 2)}[resample]


def _apply_triton(x, a, c, mask=None, scale: float = 1.0, dy=None, u=None, v=None, extra=None,
                  resample: str | None = None):
    """The elementwise pass; ``resample`` ("up", "down", forward, channels_last): its output 2x
    resampled as it is written (``_resample_triton`` of it, without writing it first)."""
    pair = isinstance(x, ChannelPair)
    first, second = (x.first, x.second) if pair else (x, x)  # (a ChannelPair: forward only, no autograd)
    if pair or resample:
        y = torch.empty(_resampled_shape(x, resample), device=first.device, dtype=first.dtype,
                        memory_format=torch.channels_last)
    else:
        y = torch.empty_like(x)  # keeps x's memory format
    C = x.shape[1]
    n = y.numel()
    block = 2048
    backward = dy is not None
    _apply_kernel[(triton.cdiv(n, block),)](
        first, second, dy if backward else first, a, c, u if backward else a, v if backward else a,
        first if mask is None else mask, first if extra is None else extra, y, n, C, first.shape[1],
        y.shape[2:].numel(), y.shape[-1], scale, CHANNELS_LAST=pair or _is_channels_last(x), PAIR=pair,
        RESAMPLE=_RESAMPLE_CODES[resample], BACKWARD=backward, HAS_MASK=mask is not None,
        HAS_EXTRA=extra is not None, BLOCK=block, num_warps=8)
    return y


def _backward_triton(x, dy, A, a, c, mean, rstd, beta, raw, groups: int, per_channel: bool, mask=None,
                     scale: float = 1.0, extra=None):
    B, ch = x.shape[:2]
    cpg = ch // groups
    p1, p2 = _partial_sums(x, dy, a, c, mask, scale)
    u, v = _small(x, B, ch), _small(x, B, ch)
    dA, dC = (_small(x, ch) if per_channel else _small(x, B, ch) for _ in range(2))
    dbeta = _small(x, ch) if beta is not None else None
    _bwd_coef_kernel[(groups,)](p1, p2, A, u if beta is None else beta, u if raw is None else raw, a, mean, rstd,
                                dA, dC, u, v, u if dbeta is None else dbeta, B, ch, A.stride(0), p1.shape[1], cpg,
                                float(x[0, 0].numel()), HAS_BETA=beta is not None, PER_CHANNEL=per_channel,
                                **_group_blocks(p1, cpg), num_warps=1)
    return _apply_triton(x, a, c, mask, scale, dy, u, v, extra), dA, dC, dbeta


def _bias_add_sums_triton(h, bias, residual=None, resample: str | None = None):
    y = torch.empty_like(h)
    # (it also writes: larger tiles and more programs than the sums alone; H100, batch 16 at 256:
    # 0.28 ms against 0.27 ms for the plain pass and 0.10 ms for the sums pass it saves)
    grid, out1, out2, chunk, tiles = _sums_grid(h, True, max_c=128, block_hw=64, per_sm=8, stages=2)
    _bias_add_sums_kernel[grid](h, h if residual is None else residual, bias, y, out1, out2, h.shape[1],
                                h[0, 0].numel(), h.shape[-1], chunk, HAS_RESIDUAL=residual is not None,
                                RESAMPLE=_RESAMPLE_CODES[resample], **tiles)
    return _remember_sums(y, out1, out2)


def _bias_add_triton(h, bias, residual=None, resample: str | None = None):
    if _is_channels_last(h):
        return _bias_add_sums_triton(h, bias, residual, resample)
    y = torch.empty_like(h)
    n, block = h.numel(), 2048
    _bias_add_kernel[(triton.cdiv(n, block),)](
        h, h if residual is None else residual, bias, y, n, h.shape[1], h[0, 0].numel(),
        CHANNELS_LAST=_is_channels_last(h), HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=8)
    return y


def _skip_add_block(hw: int) -> int:
    """The pixel rows of a ``_skip_add_kernel`` program: a power of two that divides an image's
    pixels (so each program's sums belong to one image), 128 at most, 16 at least (``tl.dot``); 0
    when there is none."""
    block = min(128, hw & -hw)
    return block if block >= 16 else 0


def _skip_add_triton(h: torch.Tensor, bias: torch.Tensor, x: "ChannelPair", weight: torch.Tensor) -> torch.Tensor:
    B, N, H, W = h.shape
    CA, CS = x.first.shape[1], x.second.shape[1]
    block_m = _skip_add_block(H * W)
    w = weight.to(h.dtype).reshape(N, CA + CS)  # (a 1x1 weight is one matrix in either memory format)
    y = torch.empty_like(h)
    chunks = H * W // block_m
    out1 = torch.empty((B, chunks, N), device=h.device, dtype=torch.float32)
    out2 = torch.empty_like(out1)
    block_n, block_k = min(128, triton.next_power_of_2(N)), 64
    _skip_add_kernel[(B * chunks, triton.cdiv(N, block_n))](
        x.first, x.second, w, h, bias, y, out1, out2, CA, CS, N, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=CA % block_k == CS % block_k == 0, STAGES=3,
        PRECISION="ieee" if h.dtype == torch.float32 else "tf32", num_warps=4)  # (float32: no TF32 rounding)
    return _remember_sums(y, out1, out2)


def _copy_channels_triton(src: torch.Tensor, dst: torch.Tensor) -> None:
    """``dst.copy_(src)`` for two channels_last (B, C, H, W) tensors whose channels may be a slice of
    a wider tensor's (row stride >= C): PyTorch copies such views elementwise, not in tiles."""
    B, C, H, W = src.shape
    rows = B * H * W
    block_c = min(128, triton.next_power_of_2(C))
    block_r = max(1, 4096 // block_c)
    _copy_rows_kernel[(triton.cdiv(rows, block_r), triton.cdiv(C, block_c))](
        src, dst, rows, C, src.stride(3), dst.stride(3), BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)


def _resample_triton(x: torch.Tensor, up: bool, scale: float) -> torch.Tensor:
    B, C, H, W = x.shape
    H, W = (2 * H, 2 * W) if up else (H // 2, W // 2)
    y = torch.empty((B, C, H, W), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    n, block = y.numel(), 2048
    _resample_kernel[(triton.cdiv(n, block),)](x, y, n, C, W, scale, UP=up, BLOCK=block, num_warps=8)
    return y


def _stack_triton(a: torch.Tensor, b: torch.Tensor, channels: int, dtype: torch.dtype) -> torch.Tensor:
    B, CA, H, W = a.shape
    out = torch.empty((B, channels, H, W), device=a.device, dtype=dtype, memory_format=torch.channels_last)
    n, block = B * H * W, 128
    _stack_kernel[(triton.cdiv(n, block),)](
        a, b, out, n, H * W, a.stride(0), a.stride(1), a.stride(3), b.stride(0), b.stride(1), b.stride(3),
        CA=CA, CB=b.shape[1], COUT=channels, BLOCK=block, num_warps=4)
    return out


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and triton is not None


def _channel_totals(t: torch.Tensor) -> torch.Tensor:
    """Sum over everything but dim 1 (a conv bias's gradient), in float32."""
    t = _contiguous(t)
    if _use_triton(t):
        return _partial_sums(t)[0].sum((0, 1))
    return t.float().sum([d for d in range(t.ndim) if d != 1])


# ---------------------------------------------------------------------------------------------
# the ops
# ---------------------------------------------------------------------------------------------
def _contiguous(x: torch.Tensor) -> torch.Tensor:
    """x laid out in NCHW or channels_last, whichever it (nearly) is."""
    if x.is_contiguous() or _is_channels_last(x):
        return x
    if x.ndim == 4 and x.stride(1) == 1:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if _is_channels_last(x) else torch.contiguous_format


def _like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=_layout(x))


def _coefficients(x, A, C, beta, groups, eps, use_triton):
    return (_coefficients_triton if use_triton else _coefficients_torch)(x, A, C, beta, groups, eps)


def _apply(x, a, c, use_triton, mask=None, scale=1.0):
    return _apply_triton(x, a, c, mask, scale) if use_triton else _apply_torch(x, a, c, mask, scale)


def _backward(x, dy, A, a, c, mean, rstd, beta, raw, groups, use_triton, per_channel, mask=None, scale=1.0,
              extra=None):
    """dx, dA, dC and the input bias's dbeta (None without one); dA, dC summed over the batch for
    ``per_channel`` A and C."""
    extra = None if extra is None else _like(extra.to(x.dtype), x)
    dy = _like(dy, x)
    if use_triton:
        return _backward_triton(x, dy, A, a, c, mean, rstd, beta, raw, groups, per_channel, mask, scale, extra)
    dx, dA, dC, u, v = _backward_torch(x, dy, A, a, c, mean, rstd, beta, groups, mask, scale, extra)
    dbeta = None
    if beta is not None:  # sum over pixels and batch of dx = a dz + u x + v
        dbeta = (a * dC + u * raw + x[0, 0].numel() * v).sum(0)
    return (dx, dA.sum(0), dC.sum(0), dbeta) if per_channel else (dx, dA, dC, dbeta)


class _NormAffineSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, C, groups: int, eps: float, passthrough: bool, resample: str | None):
        ctx.set_materialize_grads(False)
        use_triton = _use_triton(x)
        ctx.per_channel = A.ndim == 1
        A, C = _rows(A, C, x.shape[0])
        a, c, mean, rstd, _ = _coefficients(x, A, C, None, groups, eps, use_triton)
        ctx.save_for_backward(x, A, a, c, mean, rstd)
        ctx.groups, ctx.use_triton, ctx.resample = groups, use_triton, resample
        y = _apply_triton(x, a, c, resample=resample) if resample else _apply(x, a, c, use_triton)
        return (y, x.view_as(x)) if passthrough else y

    @staticmethod
    def backward(ctx, dy, d_passthrough=None):
        x, A, a, c, mean, rstd = ctx.saved_tensors
        if ctx.resample and dy is not None:
            dy = _resample_adjoint(dy, ctx.resample)
        dx, dA, dC, _ = _backward(x, dy, A, a, c, mean, rstd, None, None, ctx.groups, ctx.use_triton, ctx.per_channel,
                                  extra=d_passthrough)
        return dx, dA, dC, None, None, None, None


_search_from = 0  # the smallest activation height whose fused convolutions cuDNN searches (0: all)


def search_convolutions_from(height: int) -> int:
    """With ``torch.backends.cudnn.benchmark`` on, let cuDNN time its algorithms only for the fused
    norm + convolutions on activations at least ``height`` pixels high; the others take its
    heuristic choice (0: search all). The search is paid once per process and distinct convolution
    (a 256 Stage 2 step has 91: ~5 s of its first step on an H100) and earns itself back only where
    a convolution is large. H100, 256, batch 4, searching the levels of 128 px and up instead of
    all: first step 5.3-5.4 s instead of 7.2-8.5 s, the step 27.80 ms instead of 27.66-27.78;
    searching none: 4.3-4.6 s and 28.03 ms. Returns the previous setting (to put back)."""
    global _search_from
    previous, _search_from = _search_from, height
    return previous


@contextlib.contextmanager
def _cudnn_search_for(height: int) -> Iterator[None]:
    # cudnn.benchmark is read when a convolution is dispatched; the search result (or the
    # heuristic's pick) is cached for the process, so this matters only the first time.
    if not (_search_from and height < _search_from and torch.backends.cudnn.benchmark):
        yield
        return
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = True


class _NormAffineSiLUConv(torch.autograd.Function):
    """(x + beta) -> norm -> SiLU -> (dropout) -> conv that keeps only x (and the dropout mask) for
    the backward.

    Eager autograd would keep the SiLU output (the conv's input) and the dropped-out copy as well:
    two more activations per norm. Recomputing them in the backward costs one elementwise pass;
    at batch 32 the training memory falls from 34 to 21 GiB (docs/PERFORMANCE.md). ``beta`` is the
    previous convolution's bias, folded into the statistics and the affine map instead of being
    added to the activation in a pass of its own; its gradient comes from per-channel sums the
    passes compute anyway.
    """

    @staticmethod
    def forward(ctx, x, A, C, beta, groups: int, eps: float, weight, bias, p: float, recompute: bool,
                passthrough: bool):
        ctx.set_materialize_grads(False)
        use_triton = _use_triton(x)
        ctx.per_channel = A.ndim == 1
        A, C = _rows(A, C, x.shape[0])
        a, c, mean, rstd, raw = _coefficients(x, A, C, beta, groups, eps, use_triton)
        mask = dropout_mask(x, p) if p > 0 else None
        y = _apply(x, a, c, use_triton, mask, 1.0 / (1.0 - p) if p > 0 else 1.0)
        w = weight.to(x.dtype)  # cast once: the backward uses it again
        with _cudnn_search_for(y.shape[-2]):
            out = F.conv2d(y, w, None if bias is None else bias.to(x.dtype), padding=weight.shape[-1] // 2)
        ctx.save_for_backward(x, A, a, c, mean, rstd, beta, raw, w, mask, None if recompute else y)
        ctx.groups, ctx.use_triton, ctx.p, ctx.has_bias = groups, use_triton, p, bias is not None
        ctx.weight_dtype = weight.dtype
        return (out, x.view_as(x)) if passthrough else out

    @staticmethod
    def backward(ctx, dout, d_passthrough=None):
        x, A, a, c, mean, rstd, beta, raw, w, mask, y = ctx.saved_tensors
        scale = 1.0 / (1.0 - ctx.p) if ctx.p > 0 else 1.0
        if y is None:
            y = _apply(x, a, c, ctx.use_triton, mask, scale)
        pad = w.shape[-1] // 2
        dout = _like(dout.to(x.dtype), x)
        # The bias gradient is a plain channel sum: ours is several times faster than cuDNN's
        # on channels_last activations.
        with _cudnn_search_for(y.shape[-2]):
            dy, dw, _ = torch.ops.aten.convolution_backward(
                dout, y, w, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1, [True, True, False])
        del y
        db = _channel_totals(dout).to(ctx.weight_dtype) if ctx.has_bias else None
        dx, dA, dC, dbeta = _backward(x, dy, A, a, c, mean, rstd, beta, raw, ctx.groups, ctx.use_triton,
                                      ctx.per_channel, mask, scale, d_passthrough)
        return dx, dA, dC, dbeta, None, None, dw.to(ctx.weight_dtype), db, None, None, None


def input_conv(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``conv2d(cat([a, b], 1), weight, bias, padding=k // 2)`` as one bias-free convolution over
    the two inputs, a channel of ones and zero channels up to the next power of two (16 for the
    UNet's 12), the bias held by the ones channel's centre tap (the centre tap never reads padding,
    so every pixel gets it).

    The UNet's first convolution sees 12 channels (noisy image and buffers): 24 bytes a pixel in
    bf16, too narrow for cuDNN's fast kernels, and PyTorch then added the bias in a strided pass
    of its own (H100, batch 16: conv 0.35 ms + bias 0.40 ms; batch 32 in training: a 3.1 ms
    fallback kernel). With 16 channels the convolution takes 0.19 ms, and there is no bias pass.
    The inputs are cast to the compute dtype (autocast's, else the weight's) while stacked."""
    k = weight.shape[-1]
    dtype = torch.get_autocast_dtype(a.device.type) if torch.is_autocast_enabled(a.device.type) else weight.dtype
    cin = a.shape[1] + b.shape[1]
    channels = max(8, 1 << cin.bit_length())  # power of two > cin: room for the ones channel
    ones_tap = F.pad(bias.to(weight.dtype).view(-1, 1, 1, 1), (k // 2, k // 2, k // 2, k // 2))
    zeros = weight.new_zeros((weight.shape[0], channels - cin - 1, k, k))
    w = torch.cat([weight, ones_tap, zeros], dim=1).contiguous(memory_format=torch.channels_last)
    if _use_triton(a) and a.shape[2:] == b.shape[2:] and not (a.requires_grad or b.requires_grad):
        x = _stack_triton(_contiguous(a), _contiguous(b), channels, dtype)  # (pixels at stride(3))
    else:
        fill = torch.zeros((a.shape[0], channels - cin, *a.shape[2:]), device=a.device, dtype=dtype)
        fill[:, 0] = 1.0
        x = torch.cat([a.to(dtype), b.to(dtype), fill], dim=1).contiguous(memory_format=_layout(a))
    return F.conv2d(x, w, padding=k // 2)


class _BiasAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, bias, residual, resample: str | None):
        ctx.bias_dtype, ctx.has_residual, ctx.resample = bias.dtype, residual is not None, resample
        h = _contiguous(h)
        if residual is not None:
            residual = _like(residual.to(h.dtype), h)
        if _use_triton(h):
            return _bias_add_triton(h, bias.float().contiguous(), residual, resample)
        y = h.float() + _bcast(bias.float(), h)
        return (y if residual is None else y + residual.float()).to(h.dtype)

    @staticmethod
    def backward(ctx, dout):
        dout = _contiguous(dout)  # (once here rather than in each consumer: a channel slice of a concat's gradient)
        d_residual = None
        if ctx.has_residual:
            d_residual = _resample_adjoint(dout, ctx.resample) if ctx.resample else dout
        return dout, _channel_totals(dout).to(ctx.bias_dtype), d_residual, None


class _ConcatChannels(torch.autograd.Function):
    """``torch.cat([a, b], 1)`` of channels_last CUDA tensors whose gradients come back as two
    channels_last tensors of their own. Autograd would hand on two channel slices of the output's
    gradient; every consumer then copied or added them elementwise, slowly (H100, batch 4: ~1.5 ms
    of a training step in strided copies and adds behind the decoder's skip concatenations)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.split = a.shape[1]
        out = torch.empty((a.shape[0], a.shape[1] + b.shape[1], *a.shape[2:]), device=a.device, dtype=a.dtype,
                          memory_format=torch.channels_last)
        _copy_channels_triton(a, out[:, :ctx.split])
        _copy_channels_triton(b, out[:, ctx.split:])
        return out

    @staticmethod
    def backward(ctx, dout):
        dout = dout.contiguous(memory_format=torch.channels_last)
        da, db = (torch.empty_like(half, memory_format=torch.channels_last)
                  for half in (dout[:, :ctx.split], dout[:, ctx.split:]))
        _copy_channels_triton(dout[:, :ctx.split], da)
        _copy_channels_triton(dout[:, ctx.split:], db)
        return da, db


def _joined_sums(sums_a, sums_b) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial channel sums of a channel concatenation from those of its two halves (in one
    kernel on CUDA: the reductions and concatenations in PyTorch were six small kernels a join,
    0.4 ms of a batch-16 forward of the 256 model on an H100)."""
    (a1, a2), (b1, b2) = sums_a, sums_b
    if not _use_triton(a1):
        return tuple(torch.cat([pa.sum(1, keepdim=True), pb.sum(1, keepdim=True)], dim=2)  # type: ignore[return-value]
                     for pa, pb in zip(sums_a, sums_b))
    B, CA, CB = a1.shape[0], a1.shape[2], b1.shape[2]
    out1 = torch.empty((B, 1, CA + CB), device=a1.device, dtype=torch.float32)
    out2 = torch.empty_like(out1)
    block = 64
    _join_sums_kernel[(B, triton.cdiv(CA + CB, block))](a1, a2, b1, b2, out1, out2, CA, CB, a1.shape[1], b1.shape[1],
                                                        BLOCK_K=32, BLOCK_C=block, num_warps=4)
    return out1, out2


def _concatenable(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (_use_triton(a) and a.dtype == b.dtype and a.ndim == 4 and a.shape[2:] == b.shape[2:]
            and _is_channels_last(a) and _is_channels_last(b))


def concat_channels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.cat([a, b], dim=1)``; for channels_last CUDA tensors in one tiled pass each way, the
    two gradients returned laid out like their inputs (``_ConcatChannels``)."""
    if _concatenable(a, b):
        out = _ConcatChannels.apply(a, b)
        sums_a, sums_b = _known_sums(a), _known_sums(b)
        if sums_a is not None and sums_b is not None:  # the decoder's norm then reads neither again
            _remember_sums(out, *_joined_sums(sums_a, sums_b))
        return out
    return torch.cat([a, b], dim=1)


class ChannelPair:
    """``torch.cat([first, second], dim=1)`` left unwritten: the decoder's skip concatenation in
    inference, read in place by the two ops of a fused ResBlock that consume it, its first norm
    (``norm_affine_silu_conv``) and its 1x1 skip convolution (``skip_add``).

    Writing the concatenation and reading it back cost a full pass over both halves per decoder
    block, and the skip convolution's output one more (written, then read by the residual add).
    Only without autograd (sampling): training keeps ``concat_channels``, whose backward needs
    the concatenation anyway. Anything else that meets a pair calls ``joined()``."""

    def __init__(self, first: torch.Tensor, second: torch.Tensor):
        self.first, self.second = first, second

    @staticmethod
    def possible(first: torch.Tensor, second: torch.Tensor) -> bool:
        """Whether the fused ops can read these two tensors as a pair: channels_last on CUDA with
        Triton, one dtype, one spatial size, and no gradient to compute."""
        return not (torch.is_grad_enabled() and (first.requires_grad or second.requires_grad)) and _concatenable(
            first, second)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.first.shape[0], self.first.shape[1] + self.second.shape[1], *self.first.shape[2:]))

    @property
    def device(self) -> torch.device:
        return self.first.device

    def joined(self) -> torch.Tensor:
        return concat_channels(self.first, self.second)

    def sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _joined_sums(*((_known_sums(t) or _partial_sums(t)) for t in (self.first, self.second)))


def _resample_adjoint(dy: torch.Tensor, resample: str) -> torch.Tensor:
    # the gradient through a 2x resampling: a 2 x 2 sum of the upsampled gradient, or a quarter of
    # it repeated (Triton, channels_last)
    up = resample == "up"
    return _resample_triton(dy.contiguous(memory_format=torch.channels_last), not up, 1.0 if up else 0.25)


def _fuses_resampling(x: torch.Tensor, resample: str | None) -> bool:
    """Whether a fused pass can resample ``x`` as it writes (or reads) it: Triton, channels_last,
    even height and width for pooling."""
    return bool(resample) and _use_triton(x) and _is_channels_last(x) and (
        resample == "up" or x.shape[2] % 2 == x.shape[3] % 2 == 0)


class _Resample2x(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, up: bool):
        ctx.up = up
        return _resample_triton(x, up, 1.0 if up else 0.25)

    @staticmethod
    def backward(ctx, dy):
        return _resample_adjoint(dy, "up" if ctx.up else "down"), None


def block_resample(x: torch.Tensor, up: bool) -> torch.Tensor:
    """The official up/down blocks' resampling: nearest 2x upsampling (in x's dtype: CUDA autocast
    would upsample in float32, and every later block would follow) or 2 x 2 average pooling;
    ``resample2x`` for channels_last tensors (PyTorch's channels_last pooling and upsampling are slow)."""
    if _is_channels_last(x):
        return resample2x(x, up)
    if up:
        with torch.autocast(x.device.type, enabled=False):
            return F.interpolate(x, scale_factor=2, mode="nearest")
    return F.avg_pool2d(x, kernel_size=2, stride=2)


def resample2x(x: torch.Tensor, up: bool) -> torch.Tensor:
    """Nearest 2x upsampling (``up``) or 2 x 2 average pooling of a channels_last (B, C, H, W)
    tensor with even H and W, in its dtype (sums in float32). On CUDA one Triton pass each way:
    PyTorch's channels_last pooling, upsampling and their gradients took 0.6-0.9 ms a call (H100,
    batch 4), and the view-based version below still ~1.3 ms a training step in strided copies,
    reductions and divisions."""
    if _use_triton(x) and (up or x.shape[2] % 2 == x.shape[3] % 2 == 0):
        return _Resample2x.apply(x, up)
    b, c, h, w = x.shape
    t = x.permute(0, 2, 3, 1)
    if up:
        t = t[:, :, None, :, None, :].expand(b, h, 2, w, 2, c).reshape(b, 2 * h, 2 * w, c)
    else:
        t = t.reshape(b, h // 2, 2, w // 2, 2, c).mean((2, 4))
    return t.permute(0, 3, 1, 2)


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """The keep mask of dropout with probability ``p`` (bool, x's shape and memory format), drawn
    from the global generator: the fused passes apply it and keep it for the backward, so the
    dropped-out activation is never written on its own. On CUDA four 32-bit Philox draws per
    call from a seed drawn on the device (so every replay of a captured graph draws anew);
    PyTorch's ``bernoulli_`` took as long as the whole dropout it replaces (H100, batch 4: 0.6 ms)."""
    if not (_use_triton(x) and x.is_contiguous(memory_format=_layout(x))):
        return torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - p)
    seed = torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int64)
    keep = torch.empty_like(x, dtype=torch.bool)
    n, calls = x.numel(), 512
    threshold = min(int(round(p * 2**32)), 2**32 - 1)
    _keep_mask_kernel[(triton.cdiv(n, 4 * calls),)](seed, keep, n, threshold, CALLS=calls, num_warps=4)
    return keep


def _prepare(x: torch.Tensor, groups: int, A: torch.Tensor, C: torch.Tensor):
    if x.shape[1] % groups:
        raise ValueError(f"{x.shape[1]} channels are not divisible into {groups} groups")
    A, C = A.float(), C.float()
    if not (A.ndim == C.ndim == 1):  # per-channel (C,) pairs stay so: the backward sums their gradients itself
        A, C = _rows(A, C, x.shape[0])
    return _contiguous(x), A, C


def _rows(A: torch.Tensor, C: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A and C as (batch, channels) rows of one stride, the layout the kernels read: per-channel
    vectors expanded (stride 0), the columns of one shared (B, total) table (unet.FiLMTable) in place."""
    A, C = A.expand(batch, -1), C.expand(batch, -1)
    if A.stride() != C.stride() or A.stride(1) != 1:
        A, C = A.contiguous(), C.contiguous()
    return A, C


def norm_affine_silu(x: torch.Tensor, groups: int, A: torch.Tensor, C: torch.Tensor, eps: float = 1e-5,
                     passthrough: bool = False,
                     resample: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``SiLU(GroupNorm(x, groups, no affine) * A[..., None, None] + C[..., None, None])``.

    ``x`` (B, C, ...) in any float dtype, NCHW or channels_last (the output keeps both);
    ``A``, ``C`` per-sample (B, C) or per-channel (C,) scale and shift (computed in float32; a
    GroupNorm's own weight and bias are the per-channel case). Differentiable in all three.
    ``passthrough``: also return ``x`` (a view) for a residual path, as ``norm_affine_silu_conv``.
    ``resample`` ("up" or "down"): the output 2x resampled (``block_resample``), on channels_last CUDA
    tensors as it is written (the up/down blocks' norm: one pass instead of two).
    """
    x, A, C = _prepare(x, groups, A, C)
    if not resample or _fuses_resampling(x, resample):
        return _NormAffineSiLU.apply(x, A, C, groups, eps, passthrough, resample)
    out = _NormAffineSiLU.apply(x, A, C, groups, eps, passthrough, None)
    y = out[0] if passthrough else out
    y = block_resample(y, resample == "up")
    return (y, out[1]) if passthrough else y


def norm_affine_silu_conv(x: "torch.Tensor | ChannelPair", groups: int, A: torch.Tensor, C: torch.Tensor,
                          weight: torch.Tensor, bias: torch.Tensor | None = None, *, dropout: float = 0.0, eps: float = 1e-5,
                          x_bias: torch.Tensor | None = None, recompute: bool = True,
                          passthrough: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``conv2d(dropout(norm_affine_silu(x + x_bias, groups, A, C)), weight, bias)``, keeping only
    ``x`` for the backward.

    ``weight``: a stride-1 convolution with "same" padding (the UNet's 3x3 convs), run in ``x``'s
    dtype; float32 parameters receive float32 gradients. ``x_bias`` (C,): a per-channel bias still
    to be added to ``x`` (the previous convolution's, run without it), folded into the statistics.
    ``dropout`` is applied when positive (pass 0 in eval mode). ``recompute``: the backward
    recomputes the convolution's input from ``x`` (one elementwise pass) instead of keeping it (one
    more activation per call: at 256 x 256 about 0.4 GiB an image over the UNet). ``passthrough``:
    also return ``x`` itself (a view) for a residual connection, whose gradient then joins this op's
    backward pass instead of being added to it by autograd in a pass of its own. ``x`` a
    ChannelPair (inference): its halves are read in place; passed through as the pair.
    """
    if isinstance(x, ChannelPair):
        if not dropout and x_bias is None:
            return _pair_norm_affine_silu_conv(x, groups, A, C, weight, bias, eps, passthrough)
        x = x.joined()
    x, A, C = _prepare(x, groups, A, C)
    beta = None if x_bias is None else x_bias.float()
    return _NormAffineSiLUConv.apply(x, A, C, beta, groups, eps, weight, bias, float(dropout), recompute, passthrough)


def _pair_norm_affine_silu_conv(x: ChannelPair, groups: int, A: torch.Tensor, C: torch.Tensor, weight: torch.Tensor,
                                bias: torch.Tensor | None, eps: float, passthrough: bool):
    # _NormAffineSiLUConv's forward over the pair's two halves (no autograd: nothing is kept)
    if x.shape[1] % groups:
        raise ValueError(f"{x.shape[1]} channels are not divisible into {groups} groups")
    A, C = _rows(A.float(), C.float(), x.shape[0])
    a, c, *_ = _coefficients_triton(x, A, C, None, groups, eps)
    y = _apply_triton(x, a, c)
    with _cudnn_search_for(y.shape[-2]):
        out = F.conv2d(y, weight.to(y.dtype), None if bias is None else bias.to(y.dtype), padding=weight.shape[-1] // 2)
    return (out, x) if passthrough else out


def skip_add(h: torch.Tensor, bias: torch.Tensor, x: "torch.Tensor | ChannelPair", weight: torch.Tensor) -> torch.Tensor:
    """``h + bias[c] + conv2d(x, weight)`` for a 1x1 ``weight``: a residual block's output with its
    skip convolution. ``x`` a ChannelPair: one pass over both halves and ``h`` (``_skip_add_kernel``),
    which also leaves the output's channel sums for the next norm."""
    if isinstance(x, ChannelPair):
        if _skip_add_block(h.shape[2] * h.shape[3]) and _is_channels_last(h) and h.dtype == x.first.dtype:
            return _skip_add_triton(h, bias.float().contiguous(), x, weight)
        x = x.joined()
    return bias_add(h, bias, F.conv2d(x, weight))


def bias_add(h: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None = None,
             resample: str | None = None) -> torch.Tensor:
    """``h + bias[c] (+ residual)`` in one pass, in ``h``'s dtype and memory format: a convolution's
    bias and a residual connection together (PyTorch's own broadcast bias add on channels_last
    activations is a slow strided kernel). ``resample`` ("up" or "down"): the residual 2x resampled
    to ``h``'s size first (an up/down block's skip path), on channels_last CUDA tensors as it is read."""
    if residual is not None and resample and not (_fuses_resampling(residual, resample) and _is_channels_last(h)):
        residual, resample = block_resample(residual, resample == "up"), None
    return _BiasAdd.apply(h, bias, residual, resample if residual is not None else None)
