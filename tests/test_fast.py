"""The fast path (bf16 autocast + fused attention + channels_last) against the float32 reference.

Stated tolerance (``fast.FAST_TOLERANCE``): relative L2 error of eps, latents and DDIM samples below 4e-2.
Measured: eps 2.3e-2 and latent 5e-3 on the random tiny model here, eps 1.2e-2 on the official tiny
fixture (coarse-grid weights), 1.3e-2 on the same fixture on an H100.
"""
import pytest
import torch

from diffusionrig_core.diffusion import Diffusion
from diffusionrig_core.fast import FAST_TOLERANCE, FastDenoiser, enable_fast_path
from diffusionrig_core.model import DiffusionRig, ModelConfig
from diffusionrig_core.sampling import ddim_sample


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({**ModelConfig.tiny().to_dict(), "num_head_channels": 32})  # 2 heads at 64 ch
    model = DiffusionRig(cfg)
    with torch.no_grad():  # the zero-initialised convs would make eps identically 0
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    model.eval()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    buffers = torch.rand(2, 9, 64, 64, generator=g)
    noise = torch.randn(2, 3, 64, 64, generator=g)
    t = torch.tensor([50, 700])
    with torch.no_grad():
        latent = model.encode(x0)
        x_t = Diffusion.create().q_sample(x0, t, noise)
        ref = model(x_t, t, buffers, latent)
    return model, x0, buffers, noise, t, latent, x_t, ref


def _fresh_copy(model):
    import copy

    return copy.deepcopy(model)


def test_bf16_fast_path_eps_is_within_the_stated_tolerance(setup):
    model, x0, buffers, noise, t, latent, x_t, ref = setup
    fast = enable_fast_path(_fresh_copy(model))
    with torch.no_grad():
        eps = fast(x_t, t, buffers, latent)
        z = fast.encode(x0)
    assert eps.dtype == torch.float32
    assert _rel(eps, ref) < FAST_TOLERANCE
    assert _rel(z, latent) < FAST_TOLERANCE


def test_fused_attention_and_channels_last_alone_change_nothing_but_rounding(setup):
    model, x0, buffers, noise, t, latent, x_t, ref = setup
    fast = FastDenoiser(_fresh_copy(model), dtype=torch.float32, channels_last=True)
    with torch.no_grad():
        assert torch.allclose(fast(x_t, t, buffers, latent), ref, atol=1e-5)
        assert torch.allclose(fast(x_t, t, buffers, x_start=x0), ref, atol=1e-5)


def test_ddim_with_the_fast_path_matches_float32(setup):
    model, x0, buffers, noise, t, latent, x_t, ref = setup
    fast = enable_fast_path(_fresh_copy(model))
    a = ddim_sample(model, noise, buffers, latent, steps="ddim5", clip_denoised=False)
    b = ddim_sample(fast, noise, buffers, latent, steps="ddim5", clip_denoised=False)
    assert _rel(b, a) < FAST_TOLERANCE


def test_training_through_the_fast_path_keeps_float32_parameters_and_gradients(setup):
    model, x0, buffers, noise, t, latent, x_t, ref = setup
    m = _fresh_copy(model).train()
    fast = enable_fast_path(m)
    loss = Diffusion.create().training_losses(fast, x0, buffers, t, noise).mean()
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert len(grads) == sum(1 for _ in m.parameters())
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in m.parameters())


def test_channels_last_is_off_by_default_without_fused_kernels_or_compile(setup):
    model = setup[0]
    assert not FastDenoiser(_fresh_copy(model)).channels_last
    assert FastDenoiser(_fresh_copy(model), channels_last=True).channels_last


def test_weights_cast_once_give_the_eps_of_weights_cast_in_every_call(setup):
    model, x0, buffers, noise, t, latent, x_t, ref = setup
    m = _fresh_copy(model)
    fast = FastDenoiser(m, fused=True)  # the fused blocks and FiLM table, in PyTorch on the CPU
    weights = fast.cast_weights()
    assert weights and all(w.dtype == torch.bfloat16 for w in weights.values())
    assert not any("norm" in name for name in weights)  # norms stay float32, as under autocast
    with torch.no_grad():
        every_call = fast(x_t, t, buffers, latent)
        assert torch.equal(fast(x_t, t, buffers, latent, weights=weights), every_call)
        next(m.denoisingUNet.parameters()).mul_(2)  # trained in place: a refresh follows
        assert torch.equal(fast(x_t, t, buffers, latent, weights=fast.cast_weights(into=weights)),
                           fast(x_t, t, buffers, latent))
    assert FastDenoiser(_fresh_copy(model), dtype=torch.float32).cast_weights() is None


def test_cast_all_equals_per_weight_casts_forward_and_backward():
    from diffusionrig_core.fast import cast_all

    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(5, 3, generator=g).requires_grad_(),
               torch.randn(4, 2, 3, 3, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()]
    cast = cast_all(torch.bfloat16, weights)
    assert all(torch.equal(c, w.to(torch.bfloat16)) for c, w in zip(cast, weights))
    assert cast[1].is_contiguous(memory_format=torch.channels_last)
    w_out = [torch.randn(c.shape, generator=g) for c in cast]
    grads = torch.autograd.grad(sum((c.float() * o).sum() for c, o in zip(cast, w_out)), weights)
    assert all(gr.dtype == torch.float32 and torch.equal(gr, o.to(torch.bfloat16).float()) for gr, o in zip(grads, w_out))


def test_ddp_casts_the_weights_one_unet_block_at_a_time(setup):
    model = setup[0]
    once = FastDenoiser(_fresh_copy(model), fused=False)
    blocks = FastDenoiser(_fresh_copy(model), fused=False, cast_at_once=False)
    assert once._cast_groups == [once._cast_names]
    # every weight once, in the forward's order, and a group never spans two blocks
    assert [n for g in blocks._cast_groups for n in g] == blocks._cast_names
    prefixes = [{".".join(n.split(".")[:2]) if n.startswith(("input_blocks", "output_blocks")) else n.split(".")[0]
                 for n in g} for g in blocks._cast_groups]
    assert all(len(p) == 1 for p in prefixes) and len(prefixes) == len({next(iter(p)) for p in prefixes})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_with_weights_cast_all_at_once_equals_autocast_casting_each(setup, monkeypatch):
    model, x0, buffers, noise, t, *_ = setup
    # Deterministic kernels only (cuDNN's and the attention's fastest backward passes sum in a
    # varying order): otherwise the bf16 gradients of two identical runs already differ by more
    # than the tolerance now and then (failed 4 runs in 10 on an H100).
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    m = _fresh_copy(model).cuda().train()
    for mod in m.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    net = FastDenoiser(m, sdpa=False)
    args = [a.cuda() for a in (x0, buffers, t, noise)]

    def grads():
        m.zero_grad(set_to_none=True)
        Diffusion.create().training_losses(net, *args).mean().backward()
        return [p.grad.clone() for p in m.denoisingUNet.parameters()]

    once = grads()
    monkeypatch.setattr(FastDenoiser, "casts_weights", lambda self: False)  # autocast casts each weight
    each = grads()
    scale = max(float(g.abs().max()) for g in each)
    assert max(float((a - b).abs().max()) for a, b in zip(once, each)) <= 1e-3 * scale


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_denoiser_replays_the_same_eps(setup):  # pragma: no cover - GPU only
    from diffusionrig_core.fast import GraphedDenoiser

    model, x0, buffers, noise, t, latent, x_t, ref = setup
    fast = enable_fast_path(_fresh_copy(model).cuda())
    b, z = buffers.cuda(), latent.cuda()
    graphed = GraphedDenoiser(fast, b, z, x_t.cuda())
    with torch.no_grad():
        direct = fast(x_t.cuda(), t.cuda(), b, z)
    assert torch.allclose(graphed(x_t.cuda(), t.cuda()), direct, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_training_step_equals_the_eager_step(setup):  # pragma: no cover - GPU only
    from diffusionrig_core.diffusion import Diffusion
    from diffusionrig_core.fast import CapturedStep

    model, x0, buffers, noise, t, *_ = setup
    diffusion = Diffusion.create()

    def trained(captured: bool):
        m = _fresh_copy(model).cuda().train()
        for mod in m.modules():  # dropout off: the two runs draw their masks differently
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        # float32 through the fast path's kernels (fused norms, channels_last, graphs): what is under test
        # is the capture, and bf16 rounding would make gradients that are pure noise (biases feeding a
        # GroupNorm) differ between any two runs, captured or not.
        net = FastDenoiser(m, dtype=torch.float32)
        params = list(m.parameters())
        # SGD: a parameter moves by lr x its gradient, so the runs differ only by rounding
        opt = torch.optim.SGD(params, lr=0.05, foreach=True)

        def step(x0, buffers, t, noise):
            opt.zero_grad(set_to_none=True)
            loss = diffusion.training_losses(net, x0, buffers, t, noise).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()
            return loss.detach()

        run = CapturedStep(step) if captured else step
        losses = [float(run(x0.cuda(), buffers.cuda(), t.cuda(), noise.cuda() * (1 + k / 10))) for k in range(6)]
        return losses, torch.cat([p.detach().flatten() for p in params])

    flags = (torch.backends.cudnn, "benchmark", False), (torch.backends.cudnn, "deterministic", True), \
        (torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32", False)
    saved = [getattr(obj, name) for obj, name, _ in flags]
    for obj, name, value in flags:
        setattr(obj, name, value)
    try:
        (l_eager, p_eager), (l_graph, p_graph) = trained(False), trained(True)
    finally:
        for (obj, name, _), value in zip(flags, saved):
            setattr(obj, name, value)
    p_start = torch.cat([p.detach().flatten() for p in model.parameters()]).cuda()
    assert l_graph == pytest.approx(l_eager, rel=1e-4)
    moved = (p_eager - p_start).norm()
    assert moved > 0
    # the two runs agree to a small fraction of how far the six steps moved the weights
    assert (p_graph - p_eager).norm() <= 1e-3 * moved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_denoiser_is_reused_for_new_conditions_of_the_same_shape(setup):  # pragma: no cover - GPU only
    model, x0, buffers, noise, t, latent, x_t, ref = setup
    fast = enable_fast_path(_fresh_copy(model).cuda().eval())
    b, z, x, tt = buffers.cuda(), latent.cuda(), x_t.cuda(), t.cuda()
    first = fast.graphed(b, z, x)
    second = fast.graphed(b.flip(0), -z, x)
    assert second is first  # one capture per shape
    with torch.no_grad():
        direct = fast(x, tt, b.flip(0), -z)
    assert torch.allclose(second(x, tt), direct, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_dropped_denoiser_and_its_graphs_are_collected_before_the_next_capture_not_during_it(setup):
    import gc
    import weakref

    from diffusionrig_core.fast import CapturedStep

    model, x0, buffers, noise, t, latent, x_t, ref = setup
    fast = enable_fast_path(_fresh_copy(model).cuda().eval())
    graph = weakref.ref(fast.graphed(buffers.cuda(), latent.cuda(), x_t.cuda()))
    del fast  # the denoiser and its graphs refer to each other: only the cycle collector frees them
    seen = []

    def step(x):
        seen.append((graph() is None, gc.isenabled()))
        return x * 2

    captured = CapturedStep(step, warmup=0)
    assert torch.equal(captured(torch.ones(4, device="cuda")), torch.full((4,), 2.0, device="cuda"))
    assert seen == [(True, False)]  # collected before the capture, the collector off during it
    assert gc.isenabled()


def test_bench_model_section_runs_on_the_cpu_with_the_tiny_model():
    from diffusionrig_core import bench

    rows = []
    opts = bench.BenchOptions(device="cpu", config=ModelConfig.tiny(), train_batches=(1,), sample_batches=(1,),
                              steps="ddim2", train_iters=1, warmup=1, sample_repeats=1, baseline=False,
                              extra={"sample_variants": ("fast",)}, log=lambda s: None)
    rows = bench.run_sections(["model"], opts)
    names = [r["name"] for r in rows]
    assert names == ["training images/s, batch 1", "peak training memory, batch 1", "DDIM ddim2, 1 image(s), fast"]
    assert rows[0]["value"] > 0 and rows[2]["value"] > 0
    table = bench.to_markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "| model | training images/s, batch 1 |" in table
