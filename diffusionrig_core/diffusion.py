"""The Gaussian diffusion process of DiffusionRig: schedules, respacing, q_sample and the P2 loss.

All schedule arithmetic is numpy float64, as in the official code; a per-timestep coefficient is
gathered from the float64 array and only then cast to float32 (the official ``_extract_into_tensor``).
Casting a whole array to float32 first and gathering afterwards gives the same numbers, which is what
``Diffusion.coef`` does (one small tensor per device, no host round trip per step).

The model predicts epsilon. A respaced process keeps a subset of the original timesteps
(``timestep_map``) and rebuilds its betas so its cumulative alphas equal the original ones at the kept
steps; the network always receives the *original* integer timestep.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable

import numpy as np
import torch

from .errors import InputError, TrainingError

__all__ = ["get_betas", "space_timesteps", "Diffusion"]


def get_betas(kind: str = "linear", T: int = 1000) -> np.ndarray:
    """Official ``get_named_beta_schedule`` (float64)."""
    if kind == "linear":
        scale = 1000 / T
        return np.linspace(scale * 0.0001, scale * 0.02, T, dtype=np.float64)
    if kind == "cosine":
        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)], dtype=np.float64
        )
    raise InputError(f"unknown noise schedule {kind!r}; expected 'linear' or 'cosine'")


def space_timesteps(T: int, spec: str | int | list[int] | tuple[int, ...]) -> list[int]:
    """Kept timesteps (sorted) of a respacing spec, with the official rules.

    * ``""`` -> all T steps; ``"ddimN"`` -> range(0, T, stride) with the smallest stride giving
      exactly N steps (never contains T-1);
    * ``"a,b,c"`` (or a list / an int) -> equal sections of T, each with its count of steps at a
      fractional stride, positions rounded with Python's round (banker's rounding).
    """
    if isinstance(spec, str):
        spec = spec.strip()
        if spec == "":
            return list(range(T))
        if spec.startswith("ddim"):
            try:
                desired = int(spec[4:])
            except ValueError:
                raise InputError(f"bad respacing {spec!r}: expected 'ddim' followed by a step count, e.g. 'ddim20'") from None
            for stride in range(1, T):
                if len(range(0, T, stride)) == desired:
                    return list(range(0, T, stride))
            raise InputError(f"cannot make exactly {desired} DDIM steps out of {T} with an integer stride; try another count")
        try:
            counts = [int(x) for x in spec.split(",")]
        except ValueError:
            raise InputError(f"bad respacing {spec!r}: expected 'ddimN', a number like '250' or a list like '10,10,10'") from None
    elif isinstance(spec, int):
        counts = [spec]
    else:
        counts = [int(x) for x in spec]
    if not counts or any(c < 1 for c in counts):
        raise InputError(f"bad respacing {spec!r}: every section needs at least one step")
    size_per, extra = divmod(T, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise InputError(f"cannot take {count} steps from a section of {size} timesteps (respacing {spec!r})")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        acc = 0.0
        for _ in range(count):
            steps.append(start + round(acc))
            acc += stride
        start += size
    return sorted(set(steps))


def resolve_steps(steps: str | int, T: int = 1000) -> str:
    """A user-facing step count -> respacing string. An int N means 'ddimN' where an integer stride
    gives exactly N steps (the official inference spacing), else N evenly spaced steps."""
    if isinstance(steps, str):
        return steps
    n = int(steps)
    if n < 1 or n > T:
        raise InputError(f"number of steps must be between 1 and {T}, got {n}")
    if any(len(range(0, T, s)) == n for s in range(1, T)):
        return f"ddim{n}"
    return str(n)


class Diffusion:
    """A (possibly respaced) epsilon-prediction diffusion process built from float64 betas."""

    def __init__(self, betas: np.ndarray, timestep_map: np.ndarray | list[int] | None = None,
                 base_betas: np.ndarray | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise InputError("betas must be a 1-D array in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.timestep_map = np.arange(len(betas)) if timestep_map is None else np.asarray(timestep_map, dtype=np.int64)
        self.base_betas = betas if base_betas is None else base_betas

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0, so its log is clipped to the value at t = 1.
        pv1 = self.posterior_variance[1] if len(betas) > 1 else self.posterior_variance[0]
        self.posterior_log_variance_clipped = np.log(np.append(pv1, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        # FIXED_LARGE: [posterior var at 1, beta_1, beta_2, ...] of this (respaced) process.
        self.fixed_large_variance = np.append(pv1, betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        self.log_betas = np.log(betas)
        self._cache: dict[tuple, torch.Tensor] = {}

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def create(cls, schedule: str = "linear", steps: int = 1000, respacing: str | int = "") -> "Diffusion":
        """Official ``create_gaussian_diffusion``: a schedule of ``steps`` steps, then respaced.

        Like the official code this always goes through the respacing, "" keeping every step: the
        rebuilt betas differ from the original ones in the last float64 bits.
        """
        return _base(schedule, steps).respace(respacing or "")

    def respace(self, spec: str | int | list[int]) -> "Diffusion":
        """The process restricted to the timesteps of ``spec`` (counted on the original schedule)."""
        base_ac = np.cumprod(1.0 - self.base_betas)
        keep = space_timesteps(len(self.base_betas), spec)
        new_betas, last = [], 1.0
        for k in keep:
            new_betas.append(1.0 - base_ac[k] / last)
            last = base_ac[k]
        return Diffusion(np.array(new_betas), timestep_map=keep, base_betas=self.base_betas)

    # ---- coefficients -----------------------------------------------------------------------
    def coef(self, name: str, t: torch.Tensor, ndim: int = 4) -> torch.Tensor:
        """float32 coefficient ``name`` at (respaced) indices ``t``, shaped (B, 1, ..., 1)."""
        key = (name, t.device)
        table = self._cache.get(key)
        if table is None:
            table = torch.from_numpy(np.asarray(getattr(self, name), dtype=np.float64)).float().to(t.device)
            self._cache[key] = table
        return table[t].reshape(-1, *([1] * (ndim - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Respaced indices -> original integer timesteps, which the network is fed."""
        key = ("timestep_map", t.device)
        table = self._cache.get(key)
        if table is None:
            table = torch.from_numpy(self.timestep_map).to(t.device)
            self._cache[key] = table
        return table[t]

    # ---- forward process and x0 <-> eps ------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:
            noise = torch.randn_like(x0)
        return self.coef("sqrt_alphas_cumprod", t, x0.ndim) * x0 + self.coef("sqrt_one_minus_alphas_cumprod", t, x0.ndim) * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self.coef("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t - self.coef("sqrt_recipm1_alphas_cumprod", t, x_t.ndim) * eps

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return (self.coef("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t - x0) / self.coef("sqrt_recipm1_alphas_cumprod", t, x_t.ndim)

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.coef("posterior_mean_coef1", t, x_t.ndim) * x0 + self.coef("posterior_mean_coef2", t, x_t.ndim) * x_t

    def fixed_large_log_var(self, t: torch.Tensor, ndim: int = 4) -> torch.Tensor:
        return self.coef("fixed_large_log_variance", t, ndim)

    def learned_range_log_var(self, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """LEARNED_RANGE (learn_sigma models): interpolate log beta and the clipped posterior log var."""
        frac = (v + 1) / 2
        min_log = self.coef("posterior_log_variance_clipped", t, v.ndim)
        max_log = self.coef("log_betas", t, v.ndim)
        return frac * max_log + (1 - frac) * min_log

    # ---- training loss -----------------------------------------------------------------------
    def p2_weight(self, t: torch.Tensor, gamma: float = 1.0, k: float = 1.0) -> torch.Tensor:
        """1 / (k + SNR_t)^gamma, float64 then cast (gamma = k = 1 gives 1 - alpha_bar_t). Shape (B,)."""
        name = f"_p2_{gamma!r}_{k!r}"
        if not hasattr(self, name):
            snr = 1.0 / (1.0 - self.alphas_cumprod) - 1.0
            setattr(self, name, 1.0 / (k + snr) ** gamma)
        return self.coef(name, t, 1)

    def training_losses(
        self,
        model: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        buffers: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        p2_gamma: float = 1.0,
        p2_k: float = 1.0,
        p2: bool = True,
        terms: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Per-sample epsilon MSE, P2-weighted when ``p2`` (the official training loss). Shape (B,).

        The model is called as ``model(x_t, t, buffers, x_start=x0)`` so the encoder runs on x0 inside
        the forward (BatchNorm sees the batch, as in official training). ``terms=True`` returns
        ``{"loss", "mse"}`` (the official log keys) instead.
        """
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, self.model_timesteps(t), buffers, x_start=x0)
        if out.shape != noise.shape:
            raise TrainingError(
                f"the model outputs {tuple(out.shape)} but the noise is {tuple(noise.shape)}; "
                "learn_sigma models cannot be trained with the epsilon loss (as in the official code)"
            )
        out = out.float()
        sq = (noise - out) ** 2
        dims = list(range(1, x0.ndim))
        mse = sq.mean(dim=dims)
        loss = (self.p2_weight(t, p2_gamma, p2_k).reshape(-1, *([1] * (x0.ndim - 1))) * sq).mean(dim=dims) if p2 else mse
        return {"loss": loss, "mse": mse} if terms else loss

    def sample_timesteps(self, batch: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform timesteps in [0, T) (the official UniformSampler, all weights 1)."""
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator).to(device)


@lru_cache(maxsize=8)
def _base(schedule: str, steps: int) -> Diffusion:
    return Diffusion(get_betas(schedule, steps))


@lru_cache(maxsize=32)
def cached(schedule: str = "linear", steps: int = 1000, respacing: str = "") -> Diffusion:
    """Shared Diffusion objects for the samplers (they are immutable after construction)."""
    return Diffusion.create(schedule, steps, respacing)
