"""The fast path: the same DiffusionRig in bfloat16 autocast, fused attention and fused norms.

What changes numerically and what does not:
* attention uses ``scaled_dot_product_attention`` with the same maths as the official legacy (or new)
  QKV attention (scale 1/sqrt(d) = d^-1/4 on q and k each); on GPUs this is the flash kernel;
* on CUDA each GroupNorm with its FiLMs and SiLU (and dropout, and the conv after it) is one fused op
  (``fused.py``): statistics and affine maps in float32, activations bf16;
* convolutions and matmuls run in bf16 under autocast (8-bit mantissa); GroupNorm still reduces in
  float32 and returns the input dtype, exactly as the official ``GroupNorm32`` does under AMP;
* channels_last memory format (no numerical effect; on with the fused norms or ``torch.compile``).

Host time matters as much as GPU time here (a 256 step launches thousands of kernels):
``GraphedDenoiser`` replays a denoiser from one CUDA graph and ``CapturedStep`` a whole training
step. Measured on an H100 (docs/PERFORMANCE.md): training 188-191 images/s at batch 32 (official recipe
63), DDIM-20 of one image 0.08 s (official 0.62 s), with no compilation warm-up. ``torch.compile``
remains an option.

Stated tolerance (``FAST_TOLERANCE``, asserted by tests/test_fast.py): the relative L2 error of bf16 eps,
latents and DDIM samples against float32 stays below 4e-2. Measured: eps 2.3e-2 on a random tiny model
(CPU), 1.2e-2 on the official tiny fixture model (CPU) and 1.0e-2 on it on an H100; a DDIM-10 sample of
that fixture 1.1e-2 (H100). That is bf16's 8-bit mantissa carried through ~20 residual blocks (the
official fp16 recipe has 10 bits).
Parity with the official outputs is tested on the float32 path only.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Any, Iterator

import torch
from torch import nn

from .model import DiffusionRig
from .unet import AttentionBlock

__all__ = ["FastDenoiser", "GraphedDenoiser", "CapturedStep", "enable_fast_path", "set_sdpa", "set_fused",
           "FAST_TOLERANCE"]

# Relative L2 error of the fast path against float32 that tests/test_fast.py asserts.
FAST_TOLERANCE = 4e-2


def set_sdpa(model: nn.Module, enabled: bool = True) -> None:
    """Switch every attention block of ``model`` to (or from) PyTorch's fused attention kernel."""
    for m in model.modules():
        if isinstance(m, AttentionBlock):
            m.use_sdpa = enabled


def set_fused(model: nn.Module, enabled: bool = True, recompute: bool = True) -> None:
    """Switch the UNet's GroupNorm + FiLM + SiLU passes to (or from) the fused op of ``fused.py``.
    ``recompute``: the backward recomputes each convolution's input (least memory) or keeps it
    from the forward (one elementwise pass fewer per norm; ``fused.norm_affine_silu_conv``)."""
    from .unet import ResBlock, UNetModel

    for m in model.modules():
        if isinstance(m, (ResBlock, UNetModel)):
            m.fused, m.recompute = enabled, recompute


def recompute_for_batch(batch_per_device: int) -> bool:
    """The training default for ``set_fused(recompute=...)``: recompute from 16 images a device up.

    Keeping the convolution inputs costs ~0.4 GiB an image at 256 x 256 (batch 32: 21 -> 34 GiB on an
    H100) and saves one elementwise pass per norm (H100, batch 4: 33.4 -> 32.2 ms a step)."""
    return batch_per_device >= 16


def _param_addresses(net: nn.Module) -> tuple[int, ...]:
    return tuple(p.data_ptr() for p in net.parameters())


def _device_type(model: nn.Module) -> str:
    return next(model.parameters()).device.type


class FastDenoiser(nn.Module):
    """Calls like the model (``(x_t, t, buffers, latent=None, x_start=None) -> eps``), faster.

    The wrapped model is changed in place (fused attention, channels_last); its parameters stay
    float32 so training with autocast and an fp32 optimizer works through this wrapper too.
    ``compile``: False, True (inductor default mode) or a torch.compile mode
    string, e.g. "max-autotune-no-cudagraphs" for training or "reduce-overhead" (CUDA graphs) for sampling.
    Outputs are float32.
    """

    def __init__(self, model: DiffusionRig, dtype: torch.dtype = torch.bfloat16, compile: bool | str = False,
                 channels_last: bool | None = None, sdpa: bool = True, fused: bool | None = None,
                 recompute: bool = True, cast_at_once: bool = True):
        super().__init__()
        from .fused import triton_available

        self.model = model
        self.dtype = dtype
        if fused is None:  # the Triton kernels: CUDA only, and torch.compile fuses by itself
            fused = not compile and _device_type(model) == "cuda" and triton_available()
        self.fused = fused
        # channels_last pays only with fused norms: eager GroupNorm on channels_last inputs is slow
        # (H100, DDIM-20 of 16 images in eager bf16: 2.72 s channels_last vs 2.01 s NCHW), while
        # NCHW makes cuDNN transpose every convolution's input and output.
        if channels_last is None:
            channels_last = bool(compile) or fused
        self.channels_last = channels_last
        set_sdpa(model, sdpa)
        set_fused(model, fused, recompute)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.cudagraphs = compile == "reduce-overhead" or compile == "max-autotune"
        # The weights autocast would cast: the UNet's convolutions' and linear layers' (biases stay
        # float32: the fused blocks add them in float32; time_embed's dtype is the UNet's own).
        self._cast_names = [f"{prefix}.weight" for prefix, m in model.denoisingUNet.named_modules()
                            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and not prefix.startswith("time_embed")]
        # Training casts the weights with ``cast_all``. All in one op hands every gradient back at
        # the very end of the backward: under DDP that leaves its all-reduce nothing to overlap with
        # (2 x H200, batch 32: scaling 1 -> 2 GPUs 71 %), so DDP casts one UNet block at a time.
        self._cast_groups = [self._cast_names] if cast_at_once else _by_block(self._cast_names)
        self.flat_weights: Any = None  # an optim.FlatAdam that keeps the cast weights itself
        self.unet: Any = model.denoisingUNet
        if compile:
            mode = None if compile is True else compile
            self.unet = torch.compile(model.denoisingUNet, mode=mode, dynamic=False)

    @property
    def config(self):
        return self.model.config

    @property
    def cast_names(self) -> list[str]:
        """The UNet parameters the forward reads in the compute dtype (convolution and linear weights)."""
        return list(self._cast_names)

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
                latent: torch.Tensor | None = None, x_start: torch.Tensor | None = None,
                weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``weights``: the UNet's weights from ``cast_weights`` (inference). When training on CUDA
        the weights are cast for the call with ``cast_all`` (gradients reach the float32 parameters):
        all at once, or one UNet block at a time when ``cast_at_once`` is off (DDP)."""
        with self._autocast(x_t.device.type):
            if latent is None:
                if x_start is None:
                    raise ValueError("FastDenoiser needs either a latent or x_start")
                latent = self.model.encode(self._prep(x_start))
            if self.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            args = (self._prep(x_t), t, self._prep(buffers), latent)
            if weights is None and x_t.is_cuda and torch.is_grad_enabled() and self.casts_weights():
                weights = self._weights_for_training()
            if weights is not None:
                eps = torch.func.functional_call(self.model.denoisingUNet, weights, args, strict=False)
            else:
                eps = self.unet(*args)
        eps = eps.float()
        # CUDA-graph outputs live in a pool the next replay overwrites.
        return eps.clone() if self.cudagraphs else eps

    def casts_weights(self) -> bool:
        """Whether the UNet's weights are cast to the compute dtype for its calls (bf16, not compiled)."""
        return self.dtype != torch.float32 and self.unet is self.model.denoisingUNet

    def cast_weights(self, into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor] | None:
        """The UNet's convolution and linear weights in the compute dtype, as autocast casts them in
        every call (one cast kernel per weight, ~15 % of a batch-1 call on an H100), cast once for a
        captured graph that replays many calls (inference). ``into``: refresh an earlier result in
        place. None when there is nothing to cast (float32) or the UNet is compiled."""
        if not self.casts_weights():
            return None
        params = dict(self.model.denoisingUNet.named_parameters())
        if into is None:
            into = {name: torch.empty_like(params[name], dtype=self.dtype) for name in self._cast_names}
        with torch.no_grad():
            torch._foreach_copy_(list(into.values()), [params[name] for name in into])
        return into

    def _weights_for_training(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.denoisingUNet.named_parameters())
        weights: dict[str, torch.Tensor] = {}
        if self.flat_weights is not None:  # already cast, by the optimizer's last step
            weights.update(zip(self.flat_weights.names, self.flat_weights.weights()))
        for names in self._cast_groups:
            names = [name for name in names if name not in weights]
            if names:
                weights.update(zip(names, cast_all(self.dtype, [params[name] for name in names])))
        return weights

    def graphed(self, buffers: torch.Tensor, latent: torch.Tensor, x_example: torch.Tensor) -> "GraphedDenoiser":
        """A ``denoise(x, t)`` for these conditions replayed from a CUDA graph, kept per batch shape
        (the two most recent): sampling a second photo of the same size captures nothing new."""
        graphs: list[GraphedDenoiser] = self.__dict__.setdefault("_graphs", [])
        params = _param_addresses(self)
        graphs[:] = [g for g in graphs if g.params == params]
        for g in graphs:
            if g.fits(buffers, latent, x_example):
                graphs.remove(g)
                graphs.append(g)
                return g.bind(buffers, latent)
        g = GraphedDenoiser(self, buffers, latent, x_example)
        graphs.append(g)
        del graphs[:-2]
        return g


def _by_block(names: list[str]) -> list[list[str]]:
    """Parameter names grouped by the UNet block they belong to ("input_blocks.3", "middle_block", ...),
    in order: each group's gradients are complete as soon as the backward has left that block."""
    groups: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        block = ".".join(parts[:2]) if parts[0] in ("input_blocks", "output_blocks") else parts[0]
        groups.setdefault(block, []).append(name)
    return list(groups.values())


class _CastAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dtype: torch.dtype, *weights: torch.Tensor):
        out = [torch.empty_like(w, dtype=dtype) for w in weights]  # (keeps channels_last)
        torch._foreach_copy_(out, list(weights))
        ctx.dtypes = [w.dtype for w in weights]
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        out = [torch.empty_like(g, dtype=d) for g, d in zip(grads, ctx.dtypes)]
        torch._foreach_copy_(out, list(grads))
        return (None, *out)


def cast_all(dtype: torch.dtype, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[w.to(dtype) for w in weights]``, differentiable, in a few multi-tensor kernels: autocast
    casts each weight in a kernel of its own, forward and backward (~190 small kernels a training
    step of the 256 model), and the gradients come back in the weights' dtype the same way."""
    return list(_CastAll.apply(dtype, *weights))


def enable_fast_path(model: DiffusionRig, compile: bool | str = False, dtype: torch.dtype = torch.bfloat16,
                     channels_last: bool | None = None) -> FastDenoiser:
    """``FastDenoiser(model, ...)``: a drop-in callable for the samplers and training losses."""
    return FastDenoiser(model, dtype=dtype, compile=compile, channels_last=channels_last)


@contextlib.contextmanager
def _capture_guard(graph: torch.cuda.CUDAGraph, **kwargs: Any) -> Iterator[None]:
    """``torch.cuda.graph(graph)`` with Python's cycle collector run first and held off meanwhile.

    A dead reference cycle can hold CUDA objects (a dropped FastDenoiser and its graphs refer to
    each other). PyTorch's capture no longer collects first (``torch.compiler.config.force_cudagraph_gc``
    is off), and when the collector runs in the middle of a capture, destroying a graph there
    invalidates it ("operation failed due to a previous error during capture": sampling, then
    training in one process failed in 4 of 6 tries on an H100)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, **kwargs):
            yield
    finally:
        if was_enabled:
            gc.enable()


class GraphedDenoiser:
    """``denoise(x, t)`` replayed from one captured CUDA graph: no per-kernel launch cost.

    Built for a fixed batch shape; ``net`` is the model or a FastDenoiser. The buffers and latent
    are copied into the graph's own tensors, so ``bind`` can point one graph at another photo's
    conditioning of the same shape (``FastDenoiser.graphed`` keeps graphs per shape). The first
    calls (cuDNN algorithm search, Triton compilation) run on a side stream before capture.
    """

    def __init__(self, net, buffers: torch.Tensor, latent: torch.Tensor, x_example: torch.Tensor, warmup: int = 2):
        if x_example.device.type != "cuda":
            raise ValueError("CUDA graphs need CUDA tensors")
        self.static_x = x_example.detach().clone()
        self.static_t = torch.zeros(x_example.shape[0], dtype=torch.long, device=x_example.device)
        self.static_buffers = buffers.detach().clone()
        self.static_latent = latent.detach().clone()
        args = (self.static_x, self.static_t, self.static_buffers, self.static_latent)
        self.net = net
        self.weights = net.cast_weights() if isinstance(net, FastDenoiser) else None
        kwargs = {} if self.weights is None else {"weights": self.weights}
        stream = torch.cuda.Stream(device=x_example.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(warmup):
                net(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with _capture_guard(self.graph), torch.no_grad():
            self.static_out = net(*args, **kwargs)
        # The graph reads the parameters where they were at capture: a model moved or reloaded
        # into new tensors needs a new graph.
        self.params = _param_addresses(net)

    def fits(self, buffers: torch.Tensor, latent: torch.Tensor, x: torch.Tensor) -> bool:
        return all(a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                   for a, b in ((self.static_buffers, buffers), (self.static_latent, latent), (self.static_x, x)))

    def bind(self, buffers: torch.Tensor, latent: torch.Tensor) -> "GraphedDenoiser":
        self.static_buffers.copy_(buffers)
        self.static_latent.copy_(latent)
        if self.weights is not None:  # parameters changed in place (training) reach the graph too
            self.net.cast_weights(into=self.weights)
        return self

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.static_x.copy_(x)
        self.static_t.copy_(t)
        self.graph.replay()
        return self.static_out.clone()


class CapturedStep:
    """A whole training step (forward, loss, backward, clipping, optimizer) replayed from one CUDA graph.

    ``fn(*inputs) -> loss`` must allocate the same tensors every call, set gradients to None (or zero
    them in place) at its start, and sync nothing to the host (FlatAdam or capturable fused Adam,
    foreach clipping). The first ``warmup`` calls run ``fn`` eagerly on a side stream (cuDNN's
    algorithm search, torch.compile, the allocator's warm-up); they are real steps. One is enough
    when nothing is created lazily after the first step (FlatAdam's state exists from the start, the
    gradients are set to None every step); each more cost ~0.2 s of launching from Python (256, H100).
    The next call captures the graph and every call from then on copies its inputs into the graph's
    static inputs and replays it, so a step costs one launch instead of a few thousand. Dropout stays
    random: PyTorch's generator advances its offset on every replay.
    """

    def __init__(self, fn, warmup: int = 1):
        self.fn = fn
        self.warmup = warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: list[torch.Tensor] = []
        self.static_out: Any = None

    def __call__(self, *inputs: torch.Tensor) -> Any:
        if self.graph is None and self.calls < self.warmup:
            self.calls += 1
            side = torch.cuda.Stream(device=inputs[0].device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.fn(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            self.static_inputs = [x.detach().clone() for x in inputs]
            torch.cuda.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: the DataLoader's pin-memory thread may touch CUDA while this captures.
            with _capture_guard(self.graph, capture_error_mode="thread_local"):
                self.static_out = self.fn(*self.static_inputs)
        for static, x in zip(self.static_inputs, inputs):
            static.copy_(x)
        self.graph.replay()
        return self.static_out
