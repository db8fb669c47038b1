"""Samplers driven by analytic denoisers: the exact eps of known data distributions.

For data x0 ~ N(m, s^2) per pixel and x_t = a x0 + b eps (a = sqrt(abar_t), b = sqrt(1 - abar_t)),
the optimal noise prediction is E[eps | x_t] = b (x_t - a m) / (a^2 s^2 + b^2): smooth, exact, cheap.
"""
import numpy as np
import pytest
import torch

from diffusionrig_core.diffusion import Diffusion, get_betas
from diffusionrig_core.sampling import ddim_invert, ddim_sample, ddpm_sample, make_denoiser, make_noise

ABAR = torch.tensor(np.cumprod(1 - get_betas("linear", 1000)), dtype=torch.float64)


def gaussian_denoiser(m: float, s: float):
    def denoise(x, t):
        a = ABAR[t.cpu()].float().view(-1, 1, 1, 1).sqrt()
        b = (1 - ABAR[t.cpu()].float()).view(-1, 1, 1, 1).sqrt()
        return b * (x - a * m) / (a * a * s * s + b * b)

    return denoise


def point_denoiser(mu: torch.Tensor):
    """Data = the single image mu."""
    def denoise(x, t):
        a = ABAR[t].float().view(-1, 1, 1, 1)
        return (x - a.sqrt() * mu) / (1 - a).sqrt()

    return denoise


def test_ddim_on_single_point_data_returns_that_point():
    mu = torch.rand(1, 3, 8, 8) * 1.6 - 0.8
    x = ddim_sample(point_denoiser(mu), torch.randn(4, 3, 8, 8), steps="ddim10")
    assert torch.allclose(x, mu.expand(4, -1, -1, -1), atol=1e-4)


def test_ddpm_drives_samples_to_the_data_mean_and_spread():
    torch.manual_seed(0)
    x = ddpm_sample(gaussian_denoiser(0.3, 0.2), torch.randn(16, 3, 16, 16), steps="100",
                    generator=torch.Generator().manual_seed(1))
    assert x.mean().item() == pytest.approx(0.3, abs=0.01)
    assert x.std().item() == pytest.approx(0.2, abs=0.02)


def test_ddim_drives_samples_to_the_data_mean():
    torch.manual_seed(0)
    x = ddim_sample(gaussian_denoiser(0.3, 0.5), torch.randn(16, 3, 16, 16), steps="ddim50", clip_denoised=False)
    assert x.mean().item() == pytest.approx(0.3, abs=0.02)
    # DDIM with few steps shrinks the spread (first-order ODE steps); 50 steps keep ~95 % of it.
    assert 0.44 < x.std().item() < 0.52


def test_ddim_with_eta_zero_is_deterministic_for_a_seed():
    denoise = gaussian_denoiser(0.1, 0.5)
    a = ddim_sample(denoise, make_noise((2, 3, 8, 8), [7, 8]), steps=10)
    b = ddim_sample(denoise, make_noise((2, 3, 8, 8), [7, 8]), steps=10)
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("sampler", ["ddim_eta", "ddpm"])
def test_a_seeded_sample_does_not_depend_on_its_batch(sampler):
    denoise = gaussian_denoiser(0.1, 0.5)
    seeds = [11, 3, 99, 4, 5, 6, 7, 8]

    def run(ss):
        noise = make_noise((len(ss), 3, 8, 8), ss)
        if sampler == "ddpm":
            return ddpm_sample(denoise, noise, steps="10", seeds=ss)
        return ddim_sample(denoise, noise, steps="ddim10", eta=0.7, seeds=ss)

    batch = run(seeds)
    for i, s in enumerate(seeds[:3]):
        assert torch.equal(run([s])[0], batch[i])


def test_injected_noise_is_used_in_step_order():
    denoise = gaussian_denoiser(0.0, 0.5)
    calls = []

    def noise_fn(step, x):
        calls.append(step)
        return torch.zeros_like(x)

    noise = torch.randn(1, 3, 8, 8)
    x = ddim_sample(denoise, noise, steps="ddim10", eta=0.5, noise_fn=noise_fn)
    assert calls == list(range(10))
    # zero noise with eta 0.5 is still a different path than eta 0
    assert not torch.allclose(x, ddim_sample(denoise, noise, steps="ddim10"))


def test_callback_sees_every_step_and_its_exception_stops_sampling():
    seen = []
    ddim_sample(gaussian_denoiser(0, 1), torch.randn(1, 3, 4, 4), steps="ddim10",
                callback=lambda i, n, x: seen.append((i, n, tuple(x.shape))))
    assert seen == [(i, 10, (1, 3, 4, 4)) for i in range(10)]

    class Interrupted(Exception):
        pass

    def stop(i, n, x):
        if i == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        ddim_sample(gaussian_denoiser(0, 1), torch.randn(1, 3, 4, 4), steps="ddim10", callback=stop)


def test_samplers_feed_original_timesteps_to_the_denoiser():
    seen = []

    def denoise(x, t):
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    ddim_sample(denoise, torch.zeros(1, 3, 2, 2), steps="ddim10")
    assert seen == list(range(900, -1, -100))
    seen.clear()
    ddpm_sample(denoise, torch.zeros(1, 3, 2, 2), steps="10")
    assert seen == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]


def test_inversion_then_sampling_returns_the_image():
    torch.manual_seed(0)
    denoise = gaussian_denoiser(0.0, 0.5)
    image = (0.5 * torch.randn(2, 3, 16, 16)).clamp(-1, 1)
    # Official first-order inversion: error shrinks like 1/steps (rms 0.12 at 20 steps, 0.03 at 100).
    xT = ddim_invert(denoise, image, steps="ddim100", clip_denoised=False)
    back = ddim_sample(denoise, xT, steps="ddim100", clip_denoised=False)
    assert (back - image).pow(2).mean().sqrt() < 0.04
    # With 5 fixed-point refinements per step the round trip is exact to ~4e-5 at 20 steps.
    xT = ddim_invert(denoise, image, steps="ddim20", refine=5)
    back = ddim_sample(denoise, xT, steps="ddim20")
    assert (back - image).abs().max() < 2e-4
    assert xT.std().item() == pytest.approx(1.0, abs=0.15)


def test_model_and_denoiser_forms_are_equivalent():
    calls = []

    def model(x, t, buffers, latent):
        calls.append((buffers.shape, latent.shape))
        return torch.zeros_like(x)

    denoise = make_denoiser(model, torch.zeros(1, 9, 4, 4), torch.zeros(1, 64))
    denoise(torch.zeros(1, 3, 4, 4), torch.tensor([5]))
    assert calls == [((1, 9, 4, 4), (1, 64))]
    ddim_sample(model, torch.zeros(1, 3, 4, 4), torch.zeros(1, 9, 4, 4), torch.zeros(1, 64), steps=5)
    assert len(calls) == 6


def test_learn_sigma_outputs_use_the_eps_half_and_learned_variance():
    denoise = gaussian_denoiser(0.0, 0.5)

    def six(x, t):
        return torch.cat([denoise(x, t), torch.ones_like(x)], dim=1)  # v = 1 -> log variance = log beta

    noise = torch.randn(1, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    x = ddpm_sample(six, noise, steps="10", generator=g)
    assert x.shape == (1, 3, 8, 8) and torch.isfinite(x).all()
    assert torch.allclose(ddim_sample(six, noise, steps="ddim10"), ddim_sample(denoise, noise, steps="ddim10"))


def test_a_prebuilt_diffusion_overrides_steps():
    seen = []

    def denoise(x, t):
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    ddim_sample(denoise, torch.zeros(1, 3, 2, 2), diffusion=Diffusion.create("cosine", 1000, "ddim5"))
    assert seen == [800, 600, 400, 200, 0]
