"""The Triton kernels themselves, on the CPU: Triton's interpreter runs them against the PyTorch maths.

Needs the ``triton`` package (it ships with CUDA builds of PyTorch; ``pip install triton`` adds it to
a CPU build, about 1 GB). Without it the test skips; on a GPU machine ``test_fused.py`` runs the
compiled kernels instead. The interpreter must be chosen before Triton is first imported, hence the
subprocess.
"""
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")

SCRIPT = textwrap.dedent('''
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path[:0] = [{root!r}, {tests!r}]
    import torch
    from diffusionrig_core import fused
    fused._use_triton = lambda t: True
    fused._multiprocessors = lambda index: 2  # several chunks per channel even on tiny inputs
    import test_fused as T

    import triton
    import triton.language as tl

    @triton.jit
    def _count(out_ptr, n, STEP: tl.constexpr):
        total = 0
        for _ in tl.range(0, n, STEP):
            total += 1
        tl.store(out_ptr, total)

    try:  # older interpreters (Triton 3.6) cannot loop up to a bound passed in as an argument
        _count[(1,)](torch.zeros(1, dtype=torch.int32), 5, STEP=2)
    except Exception as exc:
        print("SKIP", f"Triton {{triton.__version__}}'s interpreter cannot run the kernels' loops: {{exc!r}}"[:300])
        sys.exit(0)

    def rel(a, b):
        return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())

    worst = 0.0
    for channels_last in (False, True):
        for shape in [(2, 64, 8, 8), (3, 96, 5, 3)]:
            x, A, C = T._inputs(shape, 32, dtype=torch.float32, channels_last=channels_last)
            per_channel = (A[0].detach().clone().requires_grad_(), C[0].detach().clone().requires_grad_())
            table = torch.randn(shape[0], 3 * shape[1]).requires_grad_()  # columns read in place
            columns = (table[:, shape[1]:2 * shape[1]], 0.1 * table[:, 2 * shape[1]:])
            for AA, CC in ((A, C), per_channel, columns):
                w = torch.randn(shape)
                out, x_res = fused.norm_affine_silu(x, 32, AA, CC, passthrough=True)
                g = torch.autograd.grad((out * w).sum() + (x_res * w).sum(), (x, AA, CC))
                x2, A2, C2 = (t.detach().double().requires_grad_() for t in (x, AA, CC))
                ref = T.reference(x2, 32, A2.expand(shape[0], -1), C2.expand(shape[0], -1))
                g2 = torch.autograd.grad((ref * w.double()).sum() + (x2 * w.double()).sum(), (x2, A2, C2))
                worst = max([worst, rel(out, ref)] + [rel(a, b) for a, b in zip(g, g2)])
    fused._multiprocessors = lambda index: 64  # more chunks than one tile of the group kernels holds
    x, A, C = T._inputs((1, 32, 48, 48), 8, dtype=torch.float32, channels_last=True)
    out = fused.norm_affine_silu(x, 8, A, C)
    g = torch.autograd.grad(out.sum(), (x, A, C))
    x2, A2, C2 = (t.detach().double().requires_grad_() for t in (x, A, C))
    ref = T.reference(x2, 8, A2, C2)
    worst = max([worst, rel(out, ref)] + [rel(a, b) for a, b in zip(g, torch.autograd.grad(ref.sum(), (x2, A2, C2)))])
    fused._multiprocessors = lambda index: 2
    for passthrough in (False, True):
        out, g, ref, g_ref = T._conv_chain_grads(passthrough=passthrough)
        worst = max([worst, rel(out, ref)] + [rel(a, b) for a, b in zip(g, g_ref)])
    for residual in (False, True):
        h = torch.randn(2, 6, 4, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
        r = torch.randn(2, 6, 4, 3, requires_grad=True) if residual else None
        b = torch.randn(6, requires_grad=True)
        o, o_ref = fused.bias_add(h, b, r), h + b[:, None, None] + (r if residual else 0)
        assert o.is_contiguous(memory_format=torch.channels_last)
        inputs = (h, b, r) if residual else (h, b)
        grads = zip(torch.autograd.grad(o.sum(), inputs), torch.autograd.grad(o_ref.sum(), inputs))
        worst = max([worst, rel(o, o_ref)] + [rel(a, c) for a, c in grads])
    T._concat_check("cpu", whole_gradients=True)
    worst = max([worst] + [T._input_conv_check("cpu", cl) for cl in (False, True)])
    worst = max(worst, T._handed_sums_check("cpu"))
    worst = max(worst, T._channel_pair_check("cpu"), T._resampling_passes_check("cpu"))
    T._resample_check("cpu")
    T._dropout_mask_check("cpu")  # (through the Triton copy kernel: _use_triton is patched above)
    import test_optim  # optim.FlatAdam's kernels (the Adam of the captured training step)
    worst = max([worst] + [test_optim.flat_adam_against_torch_adam("cpu", mn) for mn in (1e-3, 0.0)])
    import tempfile  # two gloo processes summing FlatAdam's gradients against one process (bf16 rounding)
    spread = max(test_optim.flat_adam_over_processes_against_one(tempfile.mkdtemp(), mn) for mn in (1e-3, 0.0))
    assert spread < 5e-3, spread
    print("WORST", worst)
''')


def test_triton_kernels_in_the_interpreter_equal_the_reference_forward_and_backward():
    root = Path(__file__).resolve().parents[1]
    script = SCRIPT.format(root=str(root), tests=str(root / "tests"))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    if run.stdout.startswith("SKIP"):
        pytest.skip(run.stdout[5:].strip())
    worst = float(run.stdout.split("WORST")[-1])
    assert worst < 1e-5, worst
