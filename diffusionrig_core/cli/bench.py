"""``diffusionrig bench``: timings on this machine (GPU recommended), printed as a table.

Sections come from ``diffusionrig_core.bench.SECTIONS``; each gets a ``--<name>`` flag. Without any
flag every registered section runs.
"""
from __future__ import annotations

import argparse


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(",") if v)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .. import bench

    p = subparsers.add_parser(
        "bench", help="measure training and sampling speed (and other sections) on this machine",
        description="Benchmarks of DiffusionRig on this machine, beside the official recipe measured in the same "
                    "run. Sections: " + ", ".join(sorted(bench.SECTIONS)) + ".")
    for name in sorted(bench.SECTIONS):
        p.add_argument(f"--{name}", action="store_true", help=f"run the '{name}' section")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--train-batches", type=_ints, default=(32, 4), metavar="B,B", help="training batch sizes")
    p.add_argument("--sample-batches", type=_ints, default=(1, 16), metavar="B,B", help="DDIM batch sizes")
    p.add_argument("--steps", default="ddim20", help="DDIM respacing (default ddim20)")
    p.add_argument("--iters", type=int, default=10, help="timed training steps per measurement")
    p.add_argument("--no-baseline", action="store_true", help="skip the official-equivalent runs")
    p.add_argument("--train-compile", default="none",
                   help="torch.compile mode for our training step: none (the fused kernels replayed from one CUDA "
                        "graph, the default), default, max-autotune-no-cudagraphs, ...")
    p.add_argument("--memory-budget", type=float, default=None, metavar="F",
                   help="compiled training: activation memory budget in (0, 1] (recompute activations to save memory)")
    p.add_argument("--sample-compile", default="reduce-overhead", help="torch.compile mode for sampling")
    p.add_argument("--sample-variants", default="official,fast+graph",
                   help="DDIM variants to time, from: official, fast, fast+graph, fast+compile")
    p.add_argument("--repeats", type=int, default=5, help="timed DDIM runs per measurement (median reported)")
    p.add_argument("--channels-last", choices=("auto", "yes", "no"), default="auto",
                   help="memory format of our fast path (auto: channels_last with the fused kernels or when compiled)")
    p.add_argument("--tiny", action="store_true", help="use the tiny test model (a smoke test, e.g. on a CPU)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the rows as JSON")
    if "quality" not in bench.SECTIONS:
        # the ground-truth benchmark prints its own table (PSNR/SSIM/identity, not timings)
        p.add_argument("--quality", action="store_true",
                       help="edit held-out synthetic photos with the demo models and compare with the true "
                            "re-renders (PSNR, SSIM, identity); --tiny: a seconds-long smoke test")
        p.add_argument("--invert", action="store_true", help="quality: start from the DDIM-inverted source")
    return p


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from .. import bench
    from ..model import ModelConfig

    if getattr(args, "quality", False):
        from .demo import run_quality

        args.cases, args.stage1, args.personal = None, None, None
        if args.steps == "ddim20" and args.tiny:
            args.steps = None  # the tiny preset's own step count
        run_quality(args)
        if not any(getattr(args, n, False) for n in bench.SECTIONS):
            return 0
        args.json = None  # the quality rows were written there
    names = [n for n in sorted(bench.SECTIONS) if getattr(args, n, False)] or sorted(bench.SECTIONS)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    opts = bench.BenchOptions(
        device=device, train_batches=args.train_batches, sample_batches=args.sample_batches, steps=args.steps,
        train_iters=args.iters, sample_repeats=args.repeats, baseline=not args.no_baseline and device.startswith("cuda"),
        config=ModelConfig.tiny() if args.tiny else None,
        extra={"train_compile": args.train_compile, "memory_budget": args.memory_budget, "sample_compile": args.sample_compile, "channels_last": {"auto": None, "yes": True, "no": False}[args.channels_last],
               "sample_variants": tuple(v for v in args.sample_variants.split(",") if v), "args": vars(args)},
    )
    rows = bench.run_sections(names, opts)
    print(bench.to_markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0
