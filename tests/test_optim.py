"""optim.FlatAdam: torch.optim.Adam + clip_grad_norm_ over flat buffers, for the captured fast step.

The Triton kernels run on a CUDA GPU here; ``test_fused_interpreter.py`` runs the same check in
Triton's CPU interpreter when the ``triton`` package is installed.
"""
import copy
import importlib.util

import pytest
import torch
from torch import nn

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                               reason="the Triton kernels need a CUDA GPU (test_fused_interpreter.py runs them on the CPU)")


class _Net:
    """What FlatAdam reads of a FastDenoiser: the UNet's parameters, which of them the forward
    reads in bf16, and the compute dtype."""

    def __init__(self, device: str):
        torch.manual_seed(0)
        unet = nn.Sequential(nn.Linear(24, 40), nn.GroupNorm(4, 40), nn.SiLU(), nn.Conv1d(40, 8, 3, padding=1))
        self.model = nn.Module()
        self.model.denoisingUNet = unet.to(device)
        self.cast_names = ["0.weight", "3.weight"]
        self.dtype = torch.bfloat16
        self.flat_weights = None

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        weights = dict(zip(self.flat_weights.names, self.flat_weights.weights())) if self.flat_weights else {
            name: p.to(self.dtype) for name, p in self.model.denoisingUNet.named_parameters() if name in self.cast_names}
        unet = self.model.denoisingUNet
        h = torch.nn.functional.linear(x.to(self.dtype), weights["0.weight"], unet[0].bias.to(self.dtype))
        h = unet[2](unet[1](h.float().transpose(1, 2))).to(self.dtype)
        out = torch.nn.functional.conv1d(h, weights["3.weight"], unet[3].bias.to(self.dtype), padding=1)
        return (out.float() ** 2).mean() * 50


def flat_adam_against_torch_adam(device: str, max_norm: float = 1.0, steps: int = 3) -> float:
    """Largest relative difference between FlatAdam's parameters and torch.optim.Adam's after
    ``steps`` updates on the same gradients (those FlatAdam's backward produced)."""
    from diffusionrig_core.optim import FlatAdam

    net = _Net(device)
    ref_params = [p.detach().clone().requires_grad_() for p in net.model.denoisingUNet.parameters()]
    params = list(net.model.denoisingUNet.parameters())
    opt = FlatAdam(net, params, lr=1e-2, weight_decay=1e-3)
    ref = torch.optim.Adam(ref_params, lr=1e-2, weight_decay=1e-3)
    names = [n for n, _ in net.model.denoisingUNet.named_parameters()]
    worst = 0.0
    for step in range(steps):
        x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(step)).to(device)
        opt.zero_grad()
        net.loss(x).backward()
        low = dict(zip(opt.names, opt.low.grads))
        for name, p, q in zip(names, params, ref_params):
            q.grad = (low[name] if name in low else p.grad).detach().float().clone()
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(ref_params, max_norm)
        ref.step()
        opt.clip_and_step(max_norm)
        for p, q in zip(params, ref_params):
            worst = max(worst, float((p - q).detach().norm() / q.detach().norm()))
        for name, w in zip(opt.names, opt.low.copies):  # next step's bf16 weights are the new ones
            new = dict(zip(names, params))[name].detach()
            assert torch.allclose(w.float(), new, rtol=2 ** -7, atol=0)  # (within one bf16 step)
    # the state moves between the two optimizers
    back = torch.optim.Adam([p.detach().clone().requires_grad_() for p in params], lr=1e-2)
    back.load_state_dict(copy.deepcopy(opt.state_dict()))
    other = _Net(device)
    again = FlatAdam(other, list(other.model.denoisingUNet.parameters()), lr=1e-2)
    again.load_state_dict(ref.state_dict())
    assert float(again.scalars[0]) == steps
    for (p, m, v), q in zip(((p, *again._moments()[id(p)]) for p in again.params), ref_params):
        s = ref.state[q]
        worst = max(worst, float((m - s["exp_avg"]).norm() / s["exp_avg"].norm()),
                    float((v - s["exp_avg_sq"]).norm() / s["exp_avg_sq"].norm()))
    return worst


@needs_gpu
@pytest.mark.parametrize("max_norm", [1e-3, 0.0])
def test_flat_adam_updates_like_clip_grad_norm_then_torch_adam_and_shares_its_state_format(max_norm):
    assert flat_adam_against_torch_adam("cuda", max_norm) < 1e-4  # float32 rounding (GPU: 3e-5 with heavy clipping)


def _flat_adam_rank(rank: int, world: int, port: int, out: str, max_norm: float) -> None:
    import os

    import torch.distributed as dist

    from diffusionrig_core.optim import FlatAdam

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    net = _Net("cpu")
    if rank:  # the other rank starts elsewhere: FlatAdam takes rank 0's weights, as DDP would
        for p in net.model.denoisingUNet.parameters():
            p.data.add_(1.0)
    opt = FlatAdam(net, list(net.model.denoisingUNet.parameters()), lr=1e-2, weight_decay=0.5, distributed=True)
    for step in range(3):
        opt.zero_grad()
        net.loss(_batch(step)[rank::world]).backward()
        opt.clip_and_step(max_norm)
    torch.save([p.detach().clone() for p in opt.params], f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _batch(step: int) -> torch.Tensor:
    return torch.randn(4, 5, 24, generator=torch.Generator().manual_seed(step))


def flat_adam_over_processes_against_one(tmp: str, max_norm: float = 1e-3) -> float:
    """Two gloo processes with half the batch each against one process with all of it: every
    process ends with the same weights, within bf16 rounding of the one-process run's."""
    import socket

    import torch.multiprocessing as mp

    from diffusionrig_core.optim import FlatAdam

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_flat_adam_rank, args=(2, port, tmp, max_norm), nprocs=2, join=True)
    ranks = [torch.load(f"{tmp}/rank{r}.pt") for r in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*ranks))
    net = _Net("cpu")
    start = [p.detach().clone() for p in net.model.denoisingUNet.parameters()]
    opt = FlatAdam(net, list(net.model.denoisingUNet.parameters()), lr=1e-2, weight_decay=0.5)  # (decay: the mean matters)
    for step in range(3):
        opt.zero_grad()
        x = _batch(step)
        net.loss(torch.cat([x[0::2], x[1::2]])).backward()
        opt.clip_and_step(max_norm)
    moved = torch.cat([(p.detach() - s).flatten() for p, s in zip(opt.params, start)])
    return float(torch.cat([(a - p.detach()).flatten() for a, p in zip(ranks[0], opt.params)]).norm() / moved.norm())
