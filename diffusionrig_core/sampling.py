"""Samplers as plain functions over a denoiser ``denoise(x, t) -> eps``.

``t`` is a (B,) int64 tensor of *original* timesteps (0..T-1), as the network expects. A sampler
accepts either such a callable or a model called as ``model(x, t, buffers, latent)`` (DiffusionRig or
the fast wrapper): pass ``buffers`` and it builds the callable for you.

Randomness. The initial noise is an argument. The noise drawn inside the loop (DDIM with eta > 0,
DDPM) comes, in order of preference, from ``noise_fn(step_index, x)`` (inject a stored sequence),
per-sample ``seeds`` (sample i uses its own CPU ``torch.Generator`` seeded with ``seeds[i]``, so a
photo's result does not depend on its batch or device), one ``generator`` for the batch, or the
global RNG. ``make_noise(shape, seeds)`` draws the initial noise with the same per-sample rule; the
in-loop draws of a seeded sample continue that generator's stream after its initial noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from .diffusion import Diffusion, cached, resolve_steps
from .errors import InputError

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor], None]
NoiseFn = Callable[[int, torch.Tensor], torch.Tensor]

__all__ = [
    "make_noise", "make_denoiser", "ddim_sample", "ddpm_sample", "ddim_invert",
    "iter_ddim", "iter_ddpm", "Step",
]


def make_noise(shape: Sequence[int], seeds: Sequence[int], device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Initial noise (B, ...) whose sample i is ``randn`` of a CPU generator seeded with ``seeds[i]``."""
    if len(seeds) != shape[0]:
        raise InputError(f"{len(seeds)} seeds given for a batch of {shape[0]}; give one seed per sample")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=_gen(s)) for s in seeds]).to(device=device, dtype=dtype)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def make_denoiser(model: Callable[..., torch.Tensor], buffers: torch.Tensor | None = None,
                  latent: torch.Tensor | None = None) -> Denoiser:
    """``denoise(x, t)`` from a model called as ``model(x, t, buffers, latent)``.

    With ``buffers=None`` the argument is taken to be a denoiser already and returned as it is.
    """
    if buffers is None:
        if latent is not None:
            raise InputError("a latent was given without buffers; pass both, or a denoise(x, t) callable alone")
        return model

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(x, t, buffers, latent)

    return denoise


class _StepNoise:
    """Where in-loop noise comes from (see the module docstring)."""

    def __init__(self, shape: torch.Size, noise_fn: NoiseFn | None, seeds: Sequence[int] | None,
                 generator: torch.Generator | None):
        self.noise_fn, self.generator = noise_fn, generator
        self.gens = None
        if noise_fn is None and seeds is not None:
            if len(seeds) != shape[0]:
                raise InputError(f"{len(seeds)} seeds given for a batch of {shape[0]}; give one seed per sample")
            self.gens = [_gen(s) for s in seeds]
            for g in self.gens:  # skip the stream's first draw: that is the sample's initial noise
                torch.randn(tuple(shape[1:]), generator=g)

    def __call__(self, step: int, x: torch.Tensor) -> torch.Tensor:
        if self.noise_fn is not None:
            return self.noise_fn(step, x).to(device=x.device, dtype=x.dtype)
        if self.gens is not None:
            return torch.stack([torch.randn(tuple(x.shape[1:]), generator=g) for g in self.gens]).to(x.device, x.dtype)
        if self.generator is not None:
            return torch.randn(x.shape, generator=self.generator, device=self.generator.device).to(x.device, x.dtype)
        return torch.randn_like(x)


def _diffusion(diffusion: Diffusion | None, steps: str | int, schedule: str) -> Diffusion:
    return diffusion if diffusion is not None else cached(schedule, 1000, resolve_steps(steps))


def _split_output(out: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """eps, and the variance interpolation v of learn_sigma models (twice the image channels)."""
    out = out.float()
    if out.shape[1] == 2 * channels:
        return out[:, :channels], out[:, channels:]
    return out, None


def _predict(denoise: Denoiser, x: torch.Tensor, diffusion: Diffusion, i: int, clip_denoised: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """At respaced index ``i``: (t, the x0 estimate, clipped if asked, and learn_sigma's v or None)."""
    t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
    eps, v = _split_output(denoise(x, diffusion.model_timesteps(t)), x.shape[1])
    x0 = diffusion.predict_x0(x, t, eps)
    return t, (x0.clamp(-1, 1) if clip_denoised else x0), v


@dataclass
class Step:
    """One sampler step: respaced index ``index`` (counting down), the new ``x`` and the x0 estimate."""

    index: int
    timestep: int
    x: torch.Tensor
    pred_x0: torch.Tensor


def iter_ddim(denoise: Denoiser, noise: torch.Tensor, diffusion: Diffusion, eta: float = 0.0,
              clip_denoised: bool = True, step_noise: Callable[[int, torch.Tensor], torch.Tensor] | None = None
              ) -> Iterator[Step]:
    """The official ``ddim_sample_loop`` one step at a time (under no_grad)."""
    x = noise.float()
    n = diffusion.num_timesteps
    for step, i in enumerate(range(n - 1, -1, -1)):
        with torch.no_grad():
            t, x0, _ = _predict(denoise, x, diffusion, i, clip_denoised)
            # Official DDIM re-derives eps from the (clipped) x0 estimate.
            eps = diffusion.predict_eps(x, t, x0)
            a_bar = diffusion.coef("alphas_cumprod", t, x.ndim)
            a_prev = diffusion.coef("alphas_cumprod_prev", t, x.ndim)
            sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_bar)) * torch.sqrt(1 - a_bar / a_prev)
            x = x0 * torch.sqrt(a_prev) + torch.sqrt(1 - a_prev - sigma ** 2) * eps
            if eta != 0 and step_noise is not None:
                z = step_noise(step, x)
                if i != 0:
                    x = x + sigma * z
        yield Step(i, int(diffusion.timestep_map[i]), x, x0)


def iter_ddpm(denoise: Denoiser, noise: torch.Tensor, diffusion: Diffusion, clip_denoised: bool = True,
              step_noise: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> Iterator[Step]:
    """The official ``p_sample_loop`` (FIXED_LARGE variance; LEARNED_RANGE for learn_sigma models)."""
    x = noise.float()
    step_noise = step_noise or (lambda step, x: torch.randn_like(x))
    n = diffusion.num_timesteps
    for step, i in enumerate(range(n - 1, -1, -1)):
        with torch.no_grad():
            t, x0, v = _predict(denoise, x, diffusion, i, clip_denoised)
            mean = diffusion.posterior_mean(x0, x, t)
            log_var = diffusion.fixed_large_log_var(t, x.ndim) if v is None else diffusion.learned_range_log_var(t, v)
            z = step_noise(step, x)
            x = mean + torch.exp(0.5 * log_var) * z if i != 0 else mean
        yield Step(i, int(diffusion.timestep_map[i]), x, x0)


def _run(steps: Iterator[Step], total: int, callback: Callback | None) -> torch.Tensor:
    x = None
    for k, s in enumerate(steps):
        x = s.x
        if callback is not None:
            callback(k, total, x)  # an exception here (interrupt) propagates and stops sampling
    assert x is not None
    return x


def ddim_sample(
    model_or_denoise: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    buffers: torch.Tensor | None = None,
    latent: torch.Tensor | None = None,
    steps: str | int = "ddim20",
    eta: float = 0.0,
    clip_denoised: bool = True,
    schedule: str = "linear",
    seeds: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    diffusion: Diffusion | None = None,
    noise_fn: NoiseFn | None = None,
) -> torch.Tensor:
    """DDIM from ``noise`` (B,3,H,W) to x0 (official inference: "ddim20", eta 0, clipping on).

    ``steps``: a respacing string ("ddim20", "250", "10,10,10") or an int N ("ddimN" when an integer
    stride gives N steps, else N evenly spaced). ``diffusion`` overrides ``steps``/``schedule``.
    ``callback(step_index, total_steps, x)`` runs after every step.
    """
    diff = _diffusion(diffusion, steps, schedule)
    denoise = make_denoiser(model_or_denoise, buffers, latent)
    step_noise = _StepNoise(noise.shape, noise_fn, seeds, generator) if eta != 0 else None
    return _run(iter_ddim(denoise, noise, diff, eta, clip_denoised, step_noise), diff.num_timesteps, callback)


def ddpm_sample(
    model_or_denoise: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    buffers: torch.Tensor | None = None,
    latent: torch.Tensor | None = None,
    steps: str | int = "",
    clip_denoised: bool = True,
    schedule: str = "linear",
    seeds: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    diffusion: Diffusion | None = None,
    noise_fn: NoiseFn | None = None,
) -> torch.Tensor:
    """Ancestral sampling (official ``p_sample_loop``; ``steps=""`` = all 1000 steps).

    An int ``steps`` N here means N evenly spaced steps (official respacing "N", includes t = 999).
    """
    if not isinstance(steps, str):
        steps = str(int(steps))
    diff = _diffusion(diffusion, steps, schedule)
    denoise = make_denoiser(model_or_denoise, buffers, latent)
    step_noise = _StepNoise(noise.shape, noise_fn, seeds, generator)
    return _run(iter_ddpm(denoise, noise, diff, clip_denoised, step_noise), diff.num_timesteps, callback)


def _ddim_step(denoise: Denoiser, x: torch.Tensor, diff: Diffusion, i: int, clip_denoised: bool) -> torch.Tensor:
    """The deterministic sampler step from respaced index i (to alpha_bar_prev[i])."""
    t, x0, _ = _predict(denoise, x, diff, i, clip_denoised)
    eps = diff.predict_eps(x, t, x0)
    a_prev = diff.coef("alphas_cumprod_prev", t, x.ndim)
    return x0 * torch.sqrt(a_prev) + torch.sqrt(1 - a_prev) * eps


def ddim_invert(
    model_or_denoise: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    buffers: torch.Tensor | None = None,
    latent: torch.Tensor | None = None,
    steps: str | int = "ddim20",
    clip_denoised: bool = True,
    schedule: str = "linear",
    callback: Callback | None = None,
    diffusion: Diffusion | None = None,
    refine: int = 0,
    final_step_to_noise: bool = False,
) -> torch.Tensor:
    """Deterministic DDIM inversion: image x0 -> the noise x_T that ``ddim_sample`` maps back to x0.

    Each step is the official ``ddim_reverse_sample``: at respaced index i estimate eps and x0
    (clipped if ``clip_denoised``), re-derive eps from x0 and move to alpha_bar_next = alpha_bar[i+1].
    That evaluates eps at the start of the step rather than its end, so the round trip is only
    first-order accurate. ``refine`` > 0 corrects every step by that many fixed-point iterations
    (one network call each) towards the exact inverse of the sampler's step,
    ``x <- x + sqrt(abar[i+1]/abar[i]) * (x_i - step_{i+1}(x))``, which makes
    ``ddim_sample(ddim_invert(x0))`` reproduce x0 closely (tests/test_sampling.py states how closely).

    The official loop also runs the last index, whose alpha_bar_next is 0, returning a pure eps
    estimate that the sampler (which starts at alpha_bar[N-1], e.g. t = 950) cannot map back to the
    image; we stop at the sampler's first timestep instead (``final_step_to_noise=True`` runs the
    official loop to the end).
    """
    diff = _diffusion(diffusion, steps, schedule)
    denoise = make_denoiser(model_or_denoise, buffers, latent)
    n = diff.num_timesteps
    last = n if final_step_to_noise else n - 1
    image = x0.float()
    x = image
    with torch.no_grad():
        # The sampler's last step maps index 0 (alpha_bar_0 = 0.9999) to the clean image; the official
        # inversion treats the image as x at index 0. Refinement solves that step exactly too.
        gain0 = float(diff.alphas_cumprod[0]) ** 0.5
        for _ in range(refine):
            x = x + gain0 * (image - _ddim_step(denoise, x, diff, 0, clip_denoised))
        for i in range(last):
            target = x
            t, pred, _ = _predict(denoise, x, diff, i, clip_denoised)
            eps = diff.predict_eps(x, t, pred)
            a_next = diff.coef("alphas_cumprod_next", t, x.ndim)
            x = pred * torch.sqrt(a_next) + torch.sqrt(1 - a_next) * eps
            if i + 1 < n:
                gain = float(diff.alphas_cumprod[i + 1] / diff.alphas_cumprod[i]) ** 0.5
                for _ in range(refine):
                    x = x + gain * (target - _ddim_step(denoise, x, diff, i + 1, clip_denoised))
            if callback is not None:
                callback(i, last, x)
    return x
