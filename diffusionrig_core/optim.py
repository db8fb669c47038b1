"""Adam for the captured training step, over flat buffers, in one Triton pass.

The fast path trains float32 parameters through bfloat16 copies of the UNet's convolution and
linear weights (``FastDenoiser``). With ``torch.optim.Adam`` a step then casts those weights to
bf16 before the forward (0.6 ms of an H100 step at batch 4), hands their bf16 gradients back as
float32 tensors (0.3 ms), takes the gradient norm for clipping (0.25 ms) and runs Adam over float32
gradients (1.8 ms). ``FlatAdam`` keeps each of the weights, their bf16 copies, bf16 gradients and
both moments in one flat buffer (the parameters become views of it); the backward copies the bf16
gradients in, and one kernel reads them and writes the weight, the moments and next step's bf16
copy. The other trainable parameters (biases, norms, the time embedding, a Stage 1 encoder) keep
float32 gradients, copied after the backward into a flat buffer of their own in a few multi-tensor
kernels, and go through the same kernel without the bf16 copy.

The maths is ``torch.optim.Adam``'s (L2 weight decay, bias corrections, eps outside the square
root) with ``clip_grad_norm_``'s factor folded into the gradient, computed on the device: nothing is
read back to the host, so the whole step can be captured in a CUDA graph. ``state_dict`` and
``load_state_dict`` use torch.optim.Adam's format, so a checkpoint resumes under either optimizer.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds: FlatAdam is only made for CUDA runs
    triton = None

_BLOCK = 4096

if triton is not None:

    @triton.jit
    def _sum_of_squares_kernel(g_ptr, out_ptr, n, BLOCK: tl.constexpr):
        off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + off, mask=off < n, other=0.0).to(tl.float32)
        tl.store(out_ptr + tl.program_id(0), tl.sum(g * g, axis=0))

    @triton.jit
    def _adam_kernel(p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, scalars_ptr, n, lr, beta1, beta2, eps, weight_decay,
                     HAS_COPY: tl.constexpr, BLOCK: tl.constexpr):
        # scalars: [step (already advanced), gradient factor (clipping)] on the device
        off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = off < n
        step = tl.load(scalars_ptr)
        factor = tl.load(scalars_ptr + 1)
        p = tl.load(p_ptr + off, mask=mask, other=0.0)
        g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32) * factor
        g = g + weight_decay * p
        m = beta1 * tl.load(m_ptr + off, mask=mask, other=0.0) + (1.0 - beta1) * g
        v = beta2 * tl.load(v_ptr + off, mask=mask, other=0.0) + (1.0 - beta2) * g * g
        correction1 = 1.0 - tl.exp(step * tl.log(beta1))
        correction2 = 1.0 - tl.exp(step * tl.log(beta2))
        p = p - (lr / correction1) * m / (tl.sqrt(v) / tl.sqrt(correction2) + eps)
        tl.store(p_ptr + off, p, mask=mask)
        tl.store(m_ptr + off, m, mask=mask)
        tl.store(v_ptr + off, v, mask=mask)
        if HAS_COPY:
            tl.store(w_ptr + off, p.to(w_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


def _views(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` laid out as ``like`` (same shapes and strides: channels_last stays so), one
    after another; element k of every buffer made this way belongs to the same parameter value."""
    out, offset = [], 0
    for t in like:
        out.append(flat.as_strided(t.shape, t.stride(), offset))
        offset += t.numel()
    return out


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


class _Group:
    """Parameters, their gradients and moments as views of flat buffers."""

    def __init__(self, params: list[nn.Parameter], grad_dtype: torch.dtype, copy_dtype: torch.dtype | None):
        device, n = params[0].device, sum(p.numel() for p in params)
        self.params = params
        self.p = torch.empty(n, device=device, dtype=torch.float32)
        for view, p in zip(_views(self.p, params), params):
            view.copy_(p.detach())
            p.data = view  # the parameter now lives in the flat buffer
        self.m, self.v = torch.zeros_like(self.p), torch.zeros_like(self.p)
        self.g = torch.zeros(n, device=device, dtype=grad_dtype)
        self.grads = _views(self.g, params)
        self.copy = torch.empty(n, device=device, dtype=copy_dtype) if copy_dtype is not None else None
        self.copies = _views(self.copy, params) if self.copy is not None else []
        if self.copy is not None:
            self.copy.copy_(self.p)
        self.exp_avg, self.exp_avg_sq = _views(self.m, params), _views(self.v, params)


class FlatAdam:
    """``torch.optim.Adam`` + ``clip_grad_norm_`` for the params of a fast-path (``FastDenoiser``)
    training step; see the module docstring. ``net``'s cast weights among ``params`` are read by the
    forward as this optimizer's bf16 copies from now on (``net.flat_weights``). ``distributed``: the
    gradients are averaged over the processes of the default process group before clipping."""

    def __init__(self, net: Any, params: list[nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, distributed: bool = False):
        if triton is None or not params:
            raise ValueError("FlatAdam needs Triton (CUDA builds of PyTorch ship it) and parameters")
        if not all(_dense(p) and p.dtype == torch.float32 for p in params):
            raise ValueError("FlatAdam needs dense float32 parameters")
        self.params = list(params)
        self.defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        unet = dict(net.model.denoisingUNet.named_parameters())
        self.names = [name for name in net.cast_names if unet[name].requires_grad]
        cast = [unet[name] for name in self.names]
        cast_ids = {id(p) for p in cast}
        rest = [p for p in self.params if id(p) not in cast_ids]
        if len(cast) + len(rest) != len(self.params):
            raise ValueError("the fast path's cast weights must all be among the trained parameters")
        self.low = _Group(cast, net.dtype, net.dtype)
        self.full = _Group(rest, torch.float32, None) if rest else None
        self.scalars = torch.zeros(2, device=self.params[0].device)  # [step, gradient factor]
        # Several processes (torchrun): the gradients are summed over them here, in the captured step,
        # instead of by DistributedDataParallel (whose captured step hung), and every process starts
        # from rank 0's weights, as DDP would make it.
        self.world = 1
        if distributed:
            import torch.distributed as dist

            self.world = dist.get_world_size()
            for g in (self.low, self.full):
                if g is not None:
                    dist.broadcast(g.p, 0)
                    if g.copy is not None:
                        g.copy.copy_(g.p)
        net.flat_weights = self

    # ---- the step --------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """The float32 gradients to None, so that autograd hands each one over instead of adding it to
        a zeroed buffer (~400 addition kernels a step, 0.6 ms on an H100 at batch 4); the bf16 ones
        are overwritten by each backward."""
        if self.full is not None:
            for p in self.full.params:
                p.grad = None

    def _gather_grads(self) -> None:
        """The float32 gradients autograd produced, into the flat buffer (zero where none came)."""
        if self.full is None:
            return
        have = [(view, p.grad) for p, view in zip(self.full.params, self.full.grads) if p.grad is not None]
        missing = [view for p, view in zip(self.full.params, self.full.grads) if p.grad is None]
        if have:
            torch._foreach_copy_([view for view, _ in have], [g for _, g in have])
        if missing:
            torch._foreach_zero_(missing)

    def weights(self) -> list[torch.Tensor]:
        """The bf16 weights for this step's forward; their gradients land in this optimizer."""
        return list(_LowWeights.apply(self, *self.low.params))

    def clip_and_step(self, max_norm: float) -> None:
        self._gather_grads()
        groups = [g for g in (self.low, self.full) if g is not None]
        step = self.scalars[0:1]
        step.add_(1.0)
        factor = self.scalars[1:2]
        if self.world > 1:  # summed over the processes; the factor below makes it their mean
            import torch.distributed as dist

            for g in groups:
                dist.all_reduce(g.g)
        if max_norm > 0:
            partials = [self._sum_of_squares(g.g) for g in groups]
            norm = torch.cat(partials).sum().sqrt() / self.world
            factor.copy_(torch.clamp(max_norm / (norm + 1e-6), max=1.0) / self.world)
        else:
            factor.fill_(1.0 / self.world)
        lr, (beta1, beta2) = self.defaults["lr"], self.defaults["betas"]
        for g in groups:
            n = g.p.numel()
            _adam_kernel[(triton.cdiv(n, _BLOCK),)](
                g.p, g.g, g.m, g.v, g.p if g.copy is None else g.copy, self.scalars, n, lr, beta1, beta2,
                self.defaults["eps"], self.defaults["weight_decay"], HAS_COPY=g.copy is not None, BLOCK=_BLOCK,
                num_warps=8)

    @staticmethod
    def _sum_of_squares(g: torch.Tensor) -> torch.Tensor:
        out = torch.empty(triton.cdiv(g.numel(), _BLOCK), device=g.device, dtype=torch.float32)
        _sum_of_squares_kernel[(out.numel(),)](g, out, g.numel(), BLOCK=_BLOCK, num_warps=8)
        return out

    # ---- torch.optim.Adam's state format ---------------------------------------------------------
    def _moments(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for g in (self.low, self.full):
            if g is not None:
                found.update({id(p): (m, v) for p, m, v in zip(g.params, g.exp_avg, g.exp_avg_sq)})
        return found

    def state_dict(self) -> dict[str, Any]:
        group = {**self.defaults, "amsgrad": False, "maximize": False, "foreach": None, "capturable": True,
                 "differentiable": False, "fused": True, "params": list(range(len(self.params)))}
        if float(self.scalars[0]) == 0:
            return {"state": {}, "param_groups": [group]}
        moments = self._moments()
        state = {i: {"step": self.scalars[0].clone(), "exp_avg": moments[id(p)][0], "exp_avg_sq": moments[id(p)][1]}
                 for i, p in enumerate(self.params)}
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError("the optimizer state belongs to another set of parameters")
        moments, saved = self._moments(), state_dict["state"]
        with torch.no_grad():
            for i, p in enumerate(self.params):
                entry = saved.get(i, saved.get(str(i)))
                if entry is None:
                    continue
                m, v = moments[id(p)]
                m.copy_(entry["exp_avg"])
                v.copy_(entry["exp_avg_sq"])
                self.scalars[0].copy_(torch.as_tensor(entry["step"], dtype=torch.float32))


class _LowWeights(torch.autograd.Function):
    """The bf16 copies Adam wrote, as the forward's weights; their gradients are copied into the
    optimizer's flat bf16 buffer instead of reaching the float32 parameters' ``.grad``."""

    @staticmethod
    def forward(ctx, opt: FlatAdam, *params: torch.Tensor):
        ctx.opt = opt
        return tuple(w.detach() for w in opt.low.copies)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        torch._foreach_copy_(ctx.opt.low.grads, list(grads))
        return (None,) + (None,) * len(grads)
