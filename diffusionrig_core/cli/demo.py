"""``diffusionrig demo``: rebuild the synthetic demo model, or measure it against the ground truth.

    diffusionrig demo build [--out DIR] [--device cuda] [--size 128] [--steps1 1800] [--steps2 200]
    diffusionrig demo quality [--tiny] [--invert] [--steps ddim20]   # same as `diffusionrig bench --quality`

Imports stay inside the functions so ``diffusionrig --help`` stays instant.
"""
from __future__ import annotations

import argparse

BUILD_EPILOG = """\
The shipped files (diffusionrig_core/demo_data/) were made with the defaults:
  diffusionrig demo build --device cuda
which takes about 3 minutes on one H200 (its 16 CPU cores draw the photos). On a CPU the same
command takes many hours; `--tiny` checks the whole chain in about a minute.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="rebuild the synthetic demo model or benchmark it against the ground truth",
        description="The synthetic demo: a procedural face world with a small trained model (Stage 1 on many "
                    "synthetic people, Stage 2 on one person's album).")
    sub = p.add_subparsers(dest="demo_command", metavar="ACTION")
    b = sub.add_parser("build", help="draw the world, build the datasets, train both stages, write the files",
                       description="Re-create the demo models with this project's own training code.",
                       epilog=BUILD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--out", default=None, help="where the models go (default: the package's demo_data folder)")
    b.add_argument("--work", default=None, help="keep the world, datasets and checkpoints in this folder "
                                                 "(default: a temporary folder, removed at the end)")
    b.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    b.add_argument("--size", type=int, default=None, help="image size of the model (default 128)")
    b.add_argument("--steps1", type=int, default=None, help="Stage 1 updates (default 1800)")
    b.add_argument("--steps2", type=int, default=None, help="Stage 2 updates (default 200)")
    b.add_argument("--batch1", type=int, default=None, help="Stage 1 batch size (default 128)")
    b.add_argument("--batch2", type=int, default=None, help="Stage 2 batch size (default 12)")
    b.add_argument("--lr1", type=float, default=None, help="Stage 1 learning rate (default 3e-4)")
    b.add_argument("--ema1", type=float, default=None,
                   help="Stage 1 EMA rate of the shipped weights (default: none, the raw weights ship; e.g. 0.995)")
    b.add_argument("--people", type=int, default=None, help="Stage 1 people (default 160)")
    b.add_argument("--photos", type=int, default=None, help="photos per Stage 1 person (default 10)")
    b.add_argument("--jobs", type=int, default=None, help="processes drawing photos (default: all CPU cores)")
    b.add_argument("--float32", action="store_true", help="store float32 weights (default float16)")
    b.add_argument("--tiny", action="store_true", help="a smoke test: 32 px, a few people, a few steps "
                                                      "(default --out ./diffusionrig-demo-tiny)")
    q = sub.add_parser("quality", help="edit held-out synthetic photos and compare with the true re-renders",
                       description="The ground-truth benchmark (also `diffusionrig bench --quality`).")
    add_quality_options(q)
    return p


def add_quality_options(q: argparse.ArgumentParser) -> None:
    q.add_argument("--tiny", action="store_true", help="one held-out case, 4 DDIM steps (a smoke test, seconds)")
    q.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    q.add_argument("--steps", default=None, help="DDIM respacing (default ddim20; tiny: ddim4)")
    q.add_argument("--cases", type=int, default=None, help="held-out cases per person (default 6; tiny: 1)")
    q.add_argument("--invert", action="store_true", help="start from the DDIM inversion of the source "
                                                         "instead of seeded noise (official: noise)")
    q.add_argument("--stage1", default=None, help="Stage 1 model (default: the demo's)")
    q.add_argument("--personal", default=None, help="personal model of the demo person (default: the demo's)")
    q.add_argument("--json", metavar="PATH", default=None, help="also write the rows as JSON")
    q.add_argument("--sheet", metavar="PNG", default=None,
                   help="write the first case as a picture: per edit, source | target | truth | physical render "
                        "| each model's result")


def run(args: argparse.Namespace) -> int:
    if args.demo_command == "build":
        return run_build(args)
    if args.demo_command == "quality":
        return run_quality(args)
    print("usage: diffusionrig demo {build,quality} ... (see diffusionrig demo --help)")
    return 0


def run_build(args: argparse.Namespace) -> int:
    from ..synthetic.demo import DemoBuildConfig, build_demo

    overrides = {k: v for k, v in dict(out=args.out, work=args.work, device=args.device, steps1=args.steps1,
                                       steps2=args.steps2, batch1=args.batch1, batch2=args.batch2, people=args.people, photos=args.photos,
                                       jobs=args.jobs).items() if v is not None}
    if args.float32:
        overrides["float16"] = False
    if args.lr1 is not None:
        overrides["lr1"] = args.lr1
    if args.ema1 is not None:
        overrides["ema1"] = args.ema1 or None
    if args.tiny and args.out is None:  # never overwrite the shipped models with a smoke test
        overrides["out"] = "diffusionrig-demo-tiny"
    config = DemoBuildConfig.tiny(**overrides) if args.tiny else DemoBuildConfig(**overrides)
    if args.size is not None:
        config.model["image_size"] = int(args.size)
    build_demo(config, log=lambda s: print(s, flush=True))
    return 0


def run_quality(args: argparse.Namespace) -> int:
    import json

    from .. import quality

    report = quality.run_quality_bench(
        preset="tiny" if args.tiny else "full", device=args.device, steps=args.steps, cases=args.cases,
        invert=bool(getattr(args, "invert", False)), stage1=getattr(args, "stage1", None),
        personal=getattr(args, "personal", None), sheet=getattr(args, "sheet", None),
        log=lambda s: print(s, flush=True))
    print(report.markdown())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=1)
    return 0
