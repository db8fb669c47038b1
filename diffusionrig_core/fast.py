"""The fast path: the same DiffusionRig in bfloat16 autocast, fused attention, channels_last.

What changes numerically and what does not:
* attention uses ``scaled_dot_product_attention`` with the same maths as the official legacy (or new)
  QKV attention (scale 1/sqrt(d) = d^-1/4 on q and k each); on GPUs this is the flash kernel;
* convolutions and matmuls run in bf16 under autocast (8-bit mantissa); GroupNorm still reduces in
  float32 and returns the input dtype, exactly as the official ``GroupNorm32`` does under AMP;
* channels_last memory format (no numerical effect; on by default only with ``torch.compile``) and,
  optionally, ``torch.compile``. Measured on an H100 (docs/PERFORMANCE.md): the big gain comes from
  compiling (fused GroupNorm/FiLM/SiLU kernels) plus CUDA graphs; eager bf16 alone is about as fast
  as the float32 reference, because the network's many normalisation and FiLM passes dominate.

Stated tolerance (``FAST_TOLERANCE``, asserted by tests/test_fast.py): the relative L2 error of bf16 eps,
latents and DDIM samples against float32 stays below 4e-2. Measured: eps 2.3e-2 on a random tiny model
(CPU), 1.2e-2 on the official tiny fixture model (CPU) and 1.3e-2 on it on an H100; a DDIM-10 sample of
that fixture 1.4e-2 (H100). That is bf16's 8-bit mantissa carried through ~20 residual blocks (the
official fp16 recipe has 10 bits).
Parity with the official outputs is tested on the float32 path only.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .model import DiffusionRig
from .unet import AttentionBlock

__all__ = ["FastDenoiser", "GraphedDenoiser", "enable_fast_path", "set_sdpa", "FAST_TOLERANCE"]

# Relative L2 error of the fast path against float32 that tests/test_fast.py asserts.
FAST_TOLERANCE = 4e-2


def set_sdpa(model: nn.Module, enabled: bool = True) -> None:
    """Switch every attention block of ``model`` to (or from) PyTorch's fused attention kernel."""
    for m in model.modules():
        if isinstance(m, AttentionBlock):
            m.use_sdpa = enabled


def _device_type(model: nn.Module) -> str:
    return next(model.parameters()).device.type


class FastDenoiser(nn.Module):
    """Calls like the model (``(x_t, t, buffers, latent=None, x_start=None) -> eps``), faster.

    The wrapped model is changed in place (fused attention, channels_last); its parameters stay
    float32 so training with autocast and an fp32 optimizer works through this wrapper too.
    ``compile``: False, True (inductor default mode) or a torch.compile mode string, e.g.
    "max-autotune-no-cudagraphs" for training or "reduce-overhead" (CUDA graphs) for sampling.
    Outputs are float32.
    """

    def __init__(self, model: DiffusionRig, dtype: torch.dtype = torch.bfloat16, compile: bool | str = False,
                 channels_last: bool | None = None, sdpa: bool = True):
        super().__init__()
        self.model = model
        self.dtype = dtype
        # channels_last pays only when compiled: eager GroupNorm on channels_last inputs is slow
        # (H100, DDIM-20 of 16 images in eager bf16: 2.72 s channels_last vs 2.01 s NCHW).
        if channels_last is None:
            channels_last = bool(compile)
        self.channels_last = channels_last
        set_sdpa(model, sdpa)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.cudagraphs = compile == "reduce-overhead" or compile == "max-autotune"
        self.unet: Any = model.denoisingUNet
        if compile:
            mode = None if compile is True else compile
            self.unet = torch.compile(model.denoisingUNet, mode=mode, dynamic=False)

    @property
    def config(self):
        return self.model.config

    def _autocast(self, device_type: str):
        enabled = self.dtype != torch.float32
        # No weight-cast cache: each weight is used once per call, and CUDA-graph capture needs it off.
        return torch.autocast(device_type=device_type, dtype=self.dtype, enabled=enabled, cache_enabled=False)

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        with self._autocast(x0.device.type):
            return self.model.encode(self._prep(x0)).float()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, buffers: torch.Tensor,
                latent: torch.Tensor | None = None, x_start: torch.Tensor | None = None) -> torch.Tensor:
        with self._autocast(x_t.device.type):
            if latent is None:
                if x_start is None:
                    raise ValueError("FastDenoiser needs either a latent or x_start")
                latent = self.model.encode(self._prep(x_start))
            if self.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            eps = self.unet(self._prep(x_t), t, self._prep(buffers), latent)
        eps = eps.float()
        # CUDA-graph outputs live in a pool the next replay overwrites.
        return eps.clone() if self.cudagraphs else eps


def enable_fast_path(model: DiffusionRig, compile: bool | str = False, dtype: torch.dtype = torch.bfloat16,
                     channels_last: bool | None = None) -> FastDenoiser:
    """``FastDenoiser(model, ...)``: a drop-in callable for the samplers and training losses."""
    return FastDenoiser(model, dtype=dtype, compile=compile, channels_last=channels_last)


class GraphedDenoiser:
    """``denoise(x, t)`` replayed from one captured CUDA graph: no per-kernel launch cost.

    Built for a fixed batch shape, buffers and latent (one sampling call); ``net`` is the model or a
    FastDenoiser. The first calls (cuDNN algorithm search) run on a side stream before capture.
    """

    def __init__(self, net, buffers: torch.Tensor, latent: torch.Tensor, x_example: torch.Tensor, warmup: int = 2):
        if x_example.device.type != "cuda":
            raise ValueError("CUDA graphs need CUDA tensors")
        self.static_x = x_example.detach().clone()
        self.static_t = torch.zeros(x_example.shape[0], dtype=torch.long, device=x_example.device)
        stream = torch.cuda.Stream(device=x_example.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(warmup):
                net(self.static_x, self.static_t, buffers, latent)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.static_out = net(self.static_x, self.static_t, buffers, latent)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.static_x.copy_(x)
        self.static_t.copy_(t)
        self.graph.replay()
        return self.static_out.clone()
