"""The fused GroupNorm + per-sample affine + SiLU op equals the unfused maths, forward and backward."""
import pytest
import torch
import torch.nn.functional as F

from diffusionrig_core.fused import (ChannelPair, bias_add, concat_channels, dropout_mask, input_conv, norm_affine_silu,
                                     norm_affine_silu_conv, resample2x, skip_add, triton_available)


def reference(x, groups, A, C, eps=1e-5):
    return F.silu(F.group_norm(x, groups, eps=eps) * A[..., None, None] + C[..., None, None])


def _inputs(shape, groups, dtype=torch.float64, device="cpu", channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(device, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    A = (1 + 0.3 * torch.randn(shape[:2], generator=g, dtype=torch.float64)).to(device, dtype)
    C = (0.3 * torch.randn(shape[:2], generator=g, dtype=torch.float64)).to(device, dtype)
    return x.requires_grad_(), A.requires_grad_(), C.requires_grad_()


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_norm_affine_silu_equals_group_norm_film_silu_in_float64(channels_last):
    x, A, C = _inputs((2, 8, 5, 3), 4, channels_last=channels_last)
    assert torch.allclose(norm_affine_silu(x, 4, A, C).double(), reference(x, 4, A, C), atol=1e-5)


def test_fused_backward_equals_autograd_of_the_unfused_maths():
    # the op computes its statistics in float32 (as the kernels do): a float32 tolerance
    x, A, C = _inputs((2, 8, 3, 4), 2)
    x2, A2, C2 = (t.detach().clone().requires_grad_() for t in (x, A, C))
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = norm_affine_silu(x, 2, A, C)
    ref = reference(x2, 2, A2, C2)
    g_fused = torch.autograd.grad((out.double() * w).sum(), (x, A, C))
    g_ref = torch.autograd.grad((ref * w).sum(), (x2, A2, C2))
    for a, b in zip(g_fused, g_ref):
        assert torch.allclose(a.double(), b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def test_passthrough_returns_x_and_sums_its_gradient_into_the_fused_backward():
    x, A, C = _inputs((2, 8, 3, 4), 2)
    x2, A2, C2 = (t.detach().clone().requires_grad_() for t in (x, A, C))
    g = torch.Generator().manual_seed(1)
    w, w_res = (torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(2))
    out, x_res = norm_affine_silu(x, 2, A, C, passthrough=True)
    assert torch.equal(x_res, x)
    g_fused = torch.autograd.grad((out.double() * w).sum() + (x_res * w_res).sum(), (x, A, C))
    g_ref = torch.autograd.grad((reference(x2, 2, A2, C2) * w).sum() + (x2 * w_res).sum(), (x2, A2, C2))
    for a, b in zip(g_fused, g_ref):
        assert torch.allclose(a.double(), b, atol=1e-4, rtol=1e-4)


def test_fused_output_keeps_the_memory_format_and_dtype():
    x, A, C = _inputs((1, 4, 4, 4), 2, dtype=torch.bfloat16, channels_last=True)
    y = norm_affine_silu(x, 2, A, C)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)


def test_fused_rejects_channels_not_divisible_into_groups():
    x, A, C = _inputs((1, 6, 2, 2), 4)
    with pytest.raises(ValueError, match="divisible"):
        norm_affine_silu(x, 4, A, C)


@pytest.mark.skipif(not triton_available(), reason="the Triton kernels need a CUDA GPU")
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 64, 32, 32), (3, 96, 17, 9), (1, 512, 8, 8)])
def test_triton_kernels_equal_the_reference_forward_and_backward(shape, channels_last):
    x, A, C = _inputs(shape, 32, dtype=torch.float32, device="cuda", channels_last=channels_last)
    w = torch.randn(shape, device="cuda")
    out = norm_affine_silu(x, 32, A, C)
    g = torch.autograd.grad((out * w).sum(), (x, A, C))
    x2, A2, C2 = (t.detach().double().requires_grad_() for t in (x, A, C))
    ref = reference(x2, 32, A2, C2)
    g_ref = torch.autograd.grad((ref * w.double()).sum(), (x2, A2, C2))
    assert torch.allclose(out.double(), ref, atol=1e-4)
    for a, b in zip(g, g_ref):
        assert ((a.double() - b).norm() / b.norm()) < 1e-4


def test_unet_with_fused_norms_equals_the_official_blocks_forward_and_backward():
    from diffusionrig_core.fast import set_fused
    from diffusionrig_core.model import DiffusionRig, ModelConfig

    torch.manual_seed(0)
    model = DiffusionRig(ModelConfig.tiny()).eval()
    with torch.no_grad():  # the zero-initialised output convs would hide the second norm's gradient
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    s = model.config.image_size
    x, buffers = torch.randn(2, 3, s, s), torch.rand(2, 9, s, s)
    t, latent = torch.tensor([10, 700]), torch.randn(2, model.config.latent_dim)

    def run(fused):
        set_fused(model, fused)
        model.zero_grad()
        out = model.denoisingUNet(x, t, buffers, latent)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (ref, g_ref), (out, g) = run(False), run(True)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    assert g.keys() == g_ref.keys()
    # Gradients that a following GroupNorm all but cancels (biases feeding a norm) are differences
    # of large numbers: compare every gradient on the scale of the largest one.
    scale = max(float(v.abs().max()) for v in g_ref.values())
    for name in g:
        assert float((g[name] - g_ref[name]).abs().max()) < 1e-5 * scale, name


def _conv_chain_grads(device="cpu", dtype=torch.float32, recompute=True, passthrough=False):
    """The fused (x + beta) -> norm -> FiLM -> SiLU -> dropout -> conv and the same chain unfused."""
    x, A, C = _inputs((2, 8, 6, 5), 4, dtype=dtype, device=device)
    beta = (0.5 * torch.randn(8, generator=torch.Generator().manual_seed(4))).to(device, dtype).requires_grad_()
    conv = torch.nn.Conv2d(8, 6, 3, padding=1).to(device, dtype)
    w = torch.randn(2, 6, 6, 5, generator=torch.Generator().manual_seed(5)).to(device, dtype)
    torch.manual_seed(3)
    out = norm_affine_silu_conv(x, 4, A, C, conv.weight, conv.bias, dropout=0.3, x_bias=beta, recompute=recompute,
                                passthrough=passthrough)
    w_res = torch.randn(x.shape, generator=torch.Generator().manual_seed(6)).to(device, dtype)
    inputs = (x, A, C, beta, conv.weight, conv.bias)
    if passthrough:  # the residual's gradient joins the op's own
        out, x_res = out
        assert torch.equal(x_res, x)
        g = torch.autograd.grad((out * w).sum() + (x_res * w_res).sum(), inputs)
    else:
        g = torch.autograd.grad((out * w).sum(), inputs)
    x2, A2, C2, beta2 = (t.detach().clone().requires_grad_() for t in (x, A, C, beta))
    torch.manual_seed(3)  # the same dropout mask: both draw it with one dropout_mask call
    keep = dropout_mask(x2, 0.3)
    ref = conv(reference(x2 + beta2[:, None, None], 4, A2, C2) * keep / 0.7)
    loss = (ref * w).sum() + ((x2 * w_res).sum() if passthrough else 0)
    g_ref = torch.autograd.grad(loss, (x2, A2, C2, beta2, conv.weight, conv.bias))
    return out, g, ref, g_ref


@pytest.mark.parametrize("recompute, passthrough", [(True, False), (False, False), (True, True)])
def test_fused_bias_norm_silu_dropout_conv_equals_the_unfused_chain_forward_and_backward(recompute, passthrough):
    out, g, ref, g_ref = _conv_chain_grads(recompute=recompute, passthrough=passthrough)
    assert torch.allclose(out, ref, atol=1e-5)
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


@pytest.mark.parametrize("residual", [False, True])
def test_bias_add_equals_bias_plus_residual_forward_and_backward(residual):
    h = torch.randn(2, 6, 4, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    r = torch.randn(2, 6, 4, 3, dtype=torch.float64, requires_grad=True) if residual else None
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    out = bias_add(h, bias, r)
    ref = h + bias[:, None, None] + (r if residual else 0)
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.allclose(out, ref)
    w = torch.randn(out.shape, dtype=torch.float64)
    inputs = (h, bias, r) if residual else (h, bias)
    for a, b in zip(torch.autograd.grad((out * w).sum(), inputs), torch.autograd.grad((ref * w).sum(), inputs)):
        assert torch.allclose(a.double(), b)


def _concat_check(device: str, whole_gradients: bool) -> None:
    a = torch.randn(2, 6, 4, 3, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
    b = torch.randn(2, 10, 4, 3, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = concat_channels(a, b)
    assert torch.equal(out, torch.cat([a, b], dim=1))
    w = torch.randn(out.shape, device=device)
    da, db = torch.autograd.grad((out * w).sum(), (a, b))
    assert torch.equal(da, w[:, :6]) and torch.equal(db, w[:, 6:])
    if whole_gradients:  # (not two channel slices of one gradient)
        assert da.is_contiguous(memory_format=torch.channels_last) and db.is_contiguous(memory_format=torch.channels_last)


def _input_conv_check(device: str, channels_last: bool) -> float:
    """input_conv against conv2d(cat(a, b)) + bias; the worst relative error of output and gradients."""
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(2, 3, 7, 5, generator=g), torch.rand(2, 9, 7, 5, generator=g)
    if channels_last:
        a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
    conv = torch.nn.Conv2d(12, 8, 3, padding=1)
    with torch.no_grad():
        conv.bias.copy_(torch.randn(8, generator=g))  # (large enough to matter at the border)
    a, b, conv = a.to(device), b.to(device), conv.to(device)
    out = input_conv(a, b, conv.weight, conv.bias)
    ref = conv(torch.cat([a, b], 1))
    w = torch.randn(ref.shape, generator=g).to(device)
    grads = zip(torch.autograd.grad((out * w).sum(), (conv.weight, conv.bias)),
                torch.autograd.grad((ref * w).sum(), (conv.weight, conv.bias)))
    return max(float((x - y).norm() / y.norm()) for x, y in [(out, ref), *grads])


@pytest.mark.parametrize("channels_last", [False, True])
def test_input_conv_equals_the_biased_convolution_of_the_concatenated_inputs(channels_last):
    assert _input_conv_check("cpu", channels_last) < 1e-6


@pytest.mark.skipif(not triton_available(), reason="the Triton kernels need a CUDA GPU")
def test_triton_input_conv_equals_the_biased_convolution_of_the_concatenated_inputs():
    torch.backends.cudnn.allow_tf32 = False
    assert max(_input_conv_check("cuda", cl) for cl in (False, True)) < 1e-5


def _handed_sums_check(device: str) -> float:
    """bias_add's output and a concatenation of two of them carry the channel sums the next norm
    would take; changing the tensor in place drops them. The worst relative error of those sums."""
    from diffusionrig_core import fused

    g = torch.Generator().manual_seed(8)
    h, r = (torch.randn(2, 64, 9, 7, generator=g).to(device).contiguous(memory_format=torch.channels_last)
            for _ in range(2))
    y = bias_add(h, torch.randn(64, generator=g).to(device), r)
    z = concat_channels(y, bias_add(r, torch.randn(64, generator=g).to(device)))
    worst = 0.0
    for t in (y, z):
        kept = fused._known_sums(t)
        assert kept is not None
        for s, want in zip(kept, (t.double().sum((2, 3)), t.double().square().sum((2, 3)))):
            worst = max(worst, float((s.double().sum(1) - want).norm() / want.norm()))
    y.mul_(2)
    assert fused._known_sums(y) is None
    return worst


@pytest.mark.skipif(not triton_available(), reason="the Triton kernels need a CUDA GPU")
def test_bias_add_and_concat_hand_their_outputs_channel_sums_to_the_next_norm():
    assert _handed_sums_check("cuda") < 1e-5


def _channel_pair_check(device: str, dtype=torch.float32) -> float:
    """A decoder block's two ops over a ChannelPair (its first norm + conv, its skip convolution with
    bias and residual) against the same ops on the written concatenation, and the output's handed
    channel sums against its own; the worst relative error."""
    from diffusionrig_core import fused

    g = torch.Generator().manual_seed(9)
    cl = torch.channels_last
    worst = 0.0
    for (ca, cs, out_ch), (hgt, wid) in (((64, 32, 32), (8, 4)), ((96, 64, 160), (4, 4))):
        a, s, h = (torch.randn(2, c, hgt, wid, generator=g).to(device, dtype).contiguous(memory_format=cl)
                   for c in (ca, cs, out_ch))
        A, C = 1 + 0.3 * torch.randn(2, ca + cs, generator=g), 0.3 * torch.randn(2, ca + cs, generator=g)
        conv_w, skip_w = (0.05 * torch.randn(out_ch, ca + cs, k, k, generator=g) for k in (3, 1))
        bias = torch.randn(out_ch, generator=g)
        A, C, conv_w, skip_w, bias = (t.to(device) for t in (A, C, conv_w, skip_w, bias))
        joined = torch.cat([a, s], 1).contiguous(memory_format=cl)
        with torch.no_grad():
            pair = ChannelPair(a, s)
            assert ChannelPair.possible(a, s)
            out, passed = norm_affine_silu_conv(pair, 32, A, C, conv_w.to(dtype), passthrough=True)
            ref = norm_affine_silu_conv(joined, 32, A, C, conv_w.to(dtype))
            y = skip_add(h, bias, passed, skip_w.to(dtype))
            y_ref = (h.double() + bias.double()[:, None, None] + F.conv2d(joined.double(), skip_w.double()))
        assert passed is pair and y.is_contiguous(memory_format=cl)
        worst = max(worst, float((out - ref).norm() / ref.norm()), float((y.double() - y_ref).norm() / y_ref.norm()))
        kept = fused._known_sums(y)
        assert kept is not None
        for total, want in zip(kept, (y.double().sum((2, 3)), y.double().square().sum((2, 3)))):
            worst = max(worst, float((total.double().sum(1) - want).norm() / want.norm()))
    return worst


@pytest.mark.skipif(not triton_available(), reason="the Triton kernels need a CUDA GPU")
def test_a_channel_pair_reads_like_its_concatenation_in_the_decoder_blocks_norm_and_skip_convolution():
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    assert _channel_pair_check("cuda") < 1e-5
    assert _channel_pair_check("cuda", torch.bfloat16) < 2e-2  # (the skip sum rounded once, to bf16)


def test_a_channel_pair_is_only_made_where_no_gradient_is_needed():
    a, s = (torch.randn(1, 32, 4, 4).contiguous(memory_format=torch.channels_last) for _ in range(2))
    assert not ChannelPair.possible(a, s)  # (the CPU: no Triton kernels read it)
    pair = ChannelPair(a, s)
    assert torch.equal(pair.joined(), torch.cat([a, s], 1)) and pair.shape == (1, 64, 4, 4)


def test_concat_channels_equals_torch_cat_forward_and_backward():
    _concat_check("cpu", whole_gradients=False)


@pytest.mark.skipif(not triton_available(), reason="the Triton kernels need a CUDA GPU")
def test_triton_concat_channels_equals_torch_cat_and_returns_whole_gradients():
    _concat_check("cuda", whole_gradients=True)


def _dropout_mask_check(device: str) -> None:
    for shape, channels_last in (((8, 16, 32, 32), True), ((3, 5, 7, 11), False)):
        x = torch.empty(shape, device=device)
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        torch.manual_seed(0)
        keep = dropout_mask(x, 0.25)
        assert keep.dtype == torch.bool and keep.shape == x.shape and keep.stride() == x.stride()
        assert abs(float(keep.float().mean()) - 0.75) < 0.02
        torch.manual_seed(0)
        assert torch.equal(dropout_mask(x, 0.25), keep)  # drawn from the global generator
        assert not torch.equal(dropout_mask(x, 0.25), keep)


def test_dropout_mask_keeps_each_element_with_probability_one_minus_p_in_the_inputs_layout():
    _dropout_mask_check("cpu")


@pytest.mark.skipif(not triton_available(), reason="the Triton kernels need a CUDA GPU")
def test_triton_dropout_mask_keeps_one_minus_p_and_follows_the_global_seed():
    _dropout_mask_check("cuda")


@pytest.mark.skipif(not triton_available(), reason="the Triton kernels need a CUDA GPU")
def test_dropout_masks_differ_between_replays_of_a_captured_graph():
    x = torch.empty(4, 64, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    dropout_mask(x, 0.1)  # (compiles the kernel outside the capture)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        keep = dropout_mask(x, 0.1)
    masks = []
    for _ in range(2):
        graph.replay()
        masks.append(keep.clone())
    assert not torch.equal(*masks)


def _resample_check(device: str, dtype=torch.float32) -> None:
    x = torch.randn(2, 6, 8, 4, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    for up, reference in ((False, lambda t: F.avg_pool2d(t, 2)), (True, lambda t: F.interpolate(t, scale_factor=2))):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, ref = resample2x(a, up), reference(b)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(out, ref, atol=1e-6)
        w = torch.randn(ref.shape, device=device, dtype=dtype)
        (out * w).sum().backward()
        (ref * w).sum().backward()
        assert torch.allclose(a.grad, b.grad, atol=1e-5)


def _resampling_passes_check(device: str) -> float:
    """The up/down blocks' passes that resample as they go (the norm writing its output resampled,
    the residual add reading its residual resampled) against resampling in a pass of its own,
    forward and backward; the worst relative error."""
    from diffusionrig_core.fused import block_resample

    g = torch.Generator().manual_seed(10)
    worst = 0.0
    for resample in ("up", "down"):
        x = torch.randn(2, 64, 6, 4, generator=g).to(device).contiguous(memory_format=torch.channels_last)
        A, C = 1 + 0.3 * torch.randn(2, 64, generator=g), 0.3 * torch.randn(2, 64, generator=g)
        size = (12, 8) if resample == "up" else (3, 2)
        h = torch.randn(2, 64, *size, generator=g).to(device).contiguous(memory_format=torch.channels_last)
        bias = torch.randn(64, generator=g).to(device)
        w1, w2 = (torch.randn(2, 64, *size, generator=g).to(device) for _ in range(2))
        leaves = [t.detach().clone().requires_grad_() for t in (x, A.to(device), C.to(device), h, bias)]
        results = []
        for fused_resampling in (True, False):
            x_, A_, C_, h_, b_ = (t.detach().clone().requires_grad_() for t in leaves)
            if fused_resampling:
                y, x_pass = norm_affine_silu(x_, 32, A_, C_, passthrough=True, resample=resample)
                out = bias_add(h_, b_, x_pass, resample=resample)
            else:
                y, x_pass = norm_affine_silu(x_, 32, A_, C_, passthrough=True)
                y = block_resample(y, resample == "up")
                out = bias_add(h_, b_, block_resample(x_pass, resample == "up"))
            assert y.shape == out.shape == h.shape and out.is_contiguous(memory_format=torch.channels_last)
            grads = torch.autograd.grad((y * w1).sum() + (out * w2).sum(), (x_, A_, C_, h_, b_))
            results.append((y, out, *grads))
        worst = max([worst] + [float((a - b).detach().norm() / b.detach().norm()) for a, b in zip(*results)])
    return worst


def test_the_up_and_down_blocks_passes_resample_as_they_go_equal_to_resampling_on_its_own():
    assert _resampling_passes_check("cpu") < 1e-6


@pytest.mark.skipif(not triton_available(), reason="the Triton kernels need a CUDA GPU")
def test_triton_passes_that_resample_as_they_go_equal_resampling_on_its_own():
    assert _resampling_passes_check("cuda") < 1e-5


def test_resample2x_equals_average_pooling_and_nearest_upsampling_forward_and_backward():
    _resample_check("cpu")


@pytest.mark.skipif(not triton_available(), reason="the Triton kernels need a CUDA GPU")
def test_triton_resample2x_equals_average_pooling_and_nearest_upsampling():
    _resample_check("cuda")


def test_the_film_table_equals_each_blocks_own_film():
    from diffusionrig_core.fast import set_fused
    from diffusionrig_core.model import DiffusionRig, ModelConfig

    torch.manual_seed(0)
    unet = DiffusionRig(ModelConfig.tiny()).denoisingUNet
    set_fused(unet)
    emb, z = torch.randn(3, unet.time_embed[-1].out_features), torch.randn(3, 64)
    blocks = unet._film_blocks()
    table = unet._film_table(emb, z)
    assert len(blocks) > 4
    for block in blocks:
        for a, b in zip(table[block], block.film(emb, z)):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6)


@pytest.mark.skipif(not triton_available(), reason="the Triton kernels need a CUDA GPU")
def test_triton_bias_norm_silu_dropout_conv_equals_the_unfused_chain():
    torch.backends.cudnn.allow_tf32 = False
    out, g, ref, g_ref = _conv_chain_grads("cuda", passthrough=True)
    assert (out - ref).norm() / ref.norm() < 1e-4
    for a, b in zip(g, g_ref):
        assert (a - b).norm() / b.norm() < 1e-4


@pytest.mark.skipif(not triton_available(), reason="the Triton kernels need a CUDA GPU")
def test_unet_on_the_gpu_with_triton_kernels_equals_the_official_blocks():
    from diffusionrig_core.fast import set_fused
    from diffusionrig_core.model import DiffusionRig, ModelConfig

    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = DiffusionRig(ModelConfig.tiny()).cuda().train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.denoisingUNet.to(memory_format=torch.channels_last)
    s = model.config.image_size
    x, buffers = torch.randn(2, 3, s, s, device="cuda"), torch.rand(2, 9, s, s, device="cuda")
    t, latent = torch.tensor([10, 700], device="cuda"), torch.randn(2, model.config.latent_dim, device="cuda")
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0

    def run(fused):
        set_fused(model, fused)
        model.zero_grad()
        out = model.denoisingUNet(x, t, buffers, latent)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.denoisingUNet.parameters()]

    (ref, g_ref), (out, g) = run(False), run(True)
    assert (out - ref).norm() / ref.norm() < 1e-4
    scale = max(float(v.abs().max()) for v in g_ref)
    assert max(float((a - b).abs().max()) for a, b in zip(g, g_ref)) < 1e-4 * scale
    with torch.no_grad():  # inference: the decoder reads its skip concatenations as ChannelPairs
        out = model.denoisingUNet(x, t, buffers, latent)
    assert (out - ref).norm() / ref.norm() < 1e-4


@pytest.mark.parametrize("up", [True, False])
def test_fast_resampling_on_channels_last_equals_the_official_resampling(up):
    from diffusionrig_core.unet import ResBlock

    block = ResBlock(32, 16, 4, 0.0, up=up, down=not up)
    x = torch.randn(2, 32, 6, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn((2, 32, 12, 8) if up else (2, 32, 3, 2))
    fast, ref = block._resample(x), block._resample(x.contiguous())
    assert fast.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(fast, ref, atol=1e-6)
    g_fast, = torch.autograd.grad((fast * w).sum(), x)
    g_ref, = torch.autograd.grad((ref * w).sum(), x)
    assert torch.allclose(g_fast, g_ref, atol=1e-6)


def test_cudnn_searches_only_the_fused_convolutions_at_or_above_the_chosen_height(monkeypatch):
    from diffusionrig_core import fused

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(fused, "_search_from", 0)
    seen = {}

    def conv(*args, **kwargs):
        seen[args[0].shape[-2]] = torch.backends.cudnn.benchmark
        return real(*args, **kwargs)

    real = fused.F.conv2d
    monkeypatch.setattr(fused.F, "conv2d", conv)
    w = torch.randn(8, 8, 3, 3)
    for size in (8, 16):
        fused.norm_affine_silu_conv(torch.randn(2, 8, size, size), 2, torch.ones(8), torch.zeros(8), w)
    assert seen == {8: True, 16: True}  # by default every convolution is searched
    assert fused.search_convolutions_from(16) == 0  # (the previous setting, for the caller to put back)
    for size in (8, 16):
        fused.norm_affine_silu_conv(torch.randn(2, 8, size, size), 2, torch.ones(8), torch.zeros(8), w)
    assert seen == {8: False, 16: True} and torch.backends.cudnn.benchmark
