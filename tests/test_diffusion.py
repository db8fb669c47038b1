"""Schedules, respacing, forward process and the P2 loss (maths only; parity in test_parity_official)."""
import numpy as np
import pytest
import torch

from diffusionrig_core.diffusion import Diffusion, get_betas, resolve_steps, space_timesteps
from diffusionrig_core.errors import InputError, TrainingError


def test_linear_schedule_matches_the_spec_values():
    betas = get_betas("linear", 1000)
    assert betas.dtype == np.float64 and betas[0] == 1e-4 and betas[-1] == 0.02
    ac = np.cumprod(1 - betas)
    assert ac[0] == pytest.approx(0.9999)
    assert ac[500] == pytest.approx(0.07780, rel=1e-3)
    assert ac[999] == pytest.approx(4.0358e-5, rel=1e-4)


def test_cosine_schedule_is_capped_at_0_999():
    betas = get_betas("cosine", 1000)
    assert betas.max() == 0.999 and (np.diff(betas) >= 0).all()
    with pytest.raises(InputError):
        get_betas("sigmoid")


def test_ddim_respacing_uses_an_integer_stride_and_never_includes_T_minus_1():
    assert space_timesteps(1000, "ddim20") == list(range(0, 1000, 50))
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim10")[-1] == 900
    with pytest.raises(InputError):
        space_timesteps(1000, "ddim999")


def test_section_respacing_uses_fractional_strides_with_bankers_rounding():
    s250 = space_timesteps(1000, "250")
    assert len(s250) == 250 and s250[:3] == [0, 4, 8] and s250[-3:] == [991, 995, 999]
    assert space_timesteps(1000, "10") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    s = space_timesteps(1000, "10,10,10")
    assert len(s) == 30 and {333, 334, 666, 667, 999} <= set(s) and s[1] == 37
    assert space_timesteps(1000, "") == list(range(1000))
    with pytest.raises(InputError):
        space_timesteps(10, "20")


def test_an_int_step_count_means_ddim_spacing_when_possible():
    assert resolve_steps(20) == "ddim20"
    assert resolve_steps(999) == "999"
    assert resolve_steps("10,10") == "10,10"


def test_respaced_process_keeps_alpha_bar_at_kept_steps_and_maps_to_original_timesteps():
    base = Diffusion.create()
    sp = base.respace("ddim10")
    assert list(sp.timestep_map) == list(range(0, 1000, 100))
    np.testing.assert_allclose(sp.alphas_cumprod, base.alphas_cumprod[::100], rtol=1e-12)
    assert sp.alphas_cumprod_prev[0] == 1.0
    assert sp.fixed_large_variance[0] == sp.posterior_variance[1]
    np.testing.assert_array_equal(sp.fixed_large_variance[1:], sp.betas[1:])
    t = torch.tensor([0, 9])
    assert sp.model_timesteps(t).tolist() == [0, 900]


def test_coefficients_are_gathered_from_float64_then_cast_to_float32():
    d = Diffusion.create()
    t = torch.tensor([0, 500, 999])
    c = d.coef("sqrt_alphas_cumprod", t)
    assert c.dtype == torch.float32 and c.shape == (3, 1, 1, 1)
    assert c.flatten().tolist() == [float(np.float32(d.sqrt_alphas_cumprod[i])) for i in (0, 500, 999)]


def test_q_sample_and_x0_prediction_invert_each_other():
    d = Diffusion.create()
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    x_t = d.q_sample(x0, t, noise)
    a = torch.tensor(d.alphas_cumprod[[0, 10, 500, 999]], dtype=torch.float64).view(-1, 1, 1, 1)
    expected = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
    assert torch.allclose(x_t.double(), expected, atol=1e-6)
    assert torch.allclose(d.predict_x0(x_t, t, noise), x0, atol=2e-3)
    assert torch.allclose(d.predict_eps(x_t, t, x0), noise, atol=2e-3)


def test_p2_weight_with_gamma_and_k_one_is_one_minus_alpha_bar():
    d = Diffusion.create()
    t = torch.arange(0, 1000, 37)
    expected = torch.tensor(1 - d.alphas_cumprod[t.numpy()], dtype=torch.float32)
    assert torch.allclose(d.p2_weight(t), expected, rtol=1e-6)
    assert d.p2_weight(torch.tensor([0])).item() == pytest.approx(1e-4, rel=1e-6)


class _ConstantModel(torch.nn.Module):
    """Predicts zeros, and records how it was called."""

    def forward(self, x_t, t, buffers, latent=None, x_start=None):
        self.seen = (t.clone(), x_start)
        return torch.zeros_like(x_t)


def test_training_loss_is_the_per_sample_weighted_eps_mse():
    d = Diffusion.create()
    model = _ConstantModel()
    x0, noise = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    t = torch.tensor([0, 999])
    plain = d.training_losses(model, x0, torch.zeros(2, 9, 8, 8), t, noise, p2=False)
    assert torch.allclose(plain, (noise ** 2).mean(dim=(1, 2, 3)))
    assert model.seen[0].tolist() == [0, 999] and model.seen[1] is x0
    p2 = d.training_losses(model, x0, torch.zeros(2, 9, 8, 8), t, noise)
    assert torch.allclose(p2, plain * d.p2_weight(t), rtol=1e-5)
    terms = d.training_losses(model, x0, torch.zeros(2, 9, 8, 8), t, noise, terms=True)
    assert set(terms) == {"loss", "mse"} and torch.allclose(terms["mse"], plain)


def test_training_a_learn_sigma_model_is_refused_like_the_official_code():
    d = Diffusion.create()

    def six(x_t, t, buffers, x_start=None):
        return torch.zeros(x_t.shape[0], 6, *x_t.shape[2:])

    with pytest.raises(TrainingError):
        d.training_losses(six, torch.randn(1, 3, 4, 4), torch.zeros(1, 9, 4, 4), torch.tensor([3]))
