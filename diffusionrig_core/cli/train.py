"""``diffusionrig finetune | train | dataset | import-lmdb``: datasets and the two training stages.

Argument parsing only; the work is done by ``diffusionrig_core.data`` and ``diffusionrig_core.train``.
Nothing heavy is imported at the top so ``diffusionrig --help`` stays instant.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

FINETUNE_EPILOG = """\
examples:
  diffusionrig finetune my_photos/ --base stage1.safetensors --out me.safetensors
  diffusionrig finetune my_photos/ --base model050000.pt --steps 3000
  diffusionrig finetune album_dataset/ --base stage1.safetensors --out me.safetensors

ALBUM is a folder of about 20 photos of one person (they are detected, FFHQ-aligned, fitted and
rendered with the album's mean face shape first, into OUT's work folder) or a dataset made by
`diffusionrig dataset --mean-shape`. The defaults are the official recipe: only the denoiser trains,
the encoder keeps its BatchNorm layers in training mode (their statistics adapt to the album),
lr 1e-5, batch 4, 5,000 steps. Interrupted runs continue where they stopped when started again.
"""

TRAIN_EPILOG = """\
examples:
  diffusionrig train ffhq_dataset/ --out runs/stage1
  torchrun --nproc_per_node 8 -m diffusionrig_core.cli train ffhq_dataset/ --out runs/stage1
  diffusionrig train ffhq_dataset/ --out runs/stage1 --steps 100000   # continue a finished run further

Official Stage 1 recipe: batch 32 per GPU, lr 1e-4, 50,000 steps, P2 weighting, gradient clipping 1.0,
a checkpoint every 5,000 steps. A run continues from the newest valid checkpoint in --out.
"""


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    _add_finetune(subparsers)
    _add_train(subparsers)
    _add_dataset(subparsers)
    _add_import(subparsers)


# ---------------------------------------------------------------------------------------------
def _training_options(p: argparse.ArgumentParser, stage: int) -> None:
    lr, batch, steps = ("1e-4", 32, "50000") if stage == 1 else ("1e-5", 4, "5000")
    g = p.add_argument_group("training (defaults: the official recipe)")
    g.add_argument("--steps", type=int, default=None, metavar="N", help=f"number of updates (default {steps})")
    g.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help=f"images per step{' per GPU' if stage == 1 else ''} (default {batch})")
    g.add_argument("--lr", type=float, default=None, help=f"Adam learning rate (default {lr})")
    g.add_argument("--save-interval", type=int, default=None, metavar="N",
                   help="write a resumable checkpoint every N steps (default "
                        f"{'5000' if stage == 1 else '2500'}; 0 = only at the end)")
    g.add_argument("--ema", type=float, default=None, metavar="RATE",
                   help="also keep an exponential moving average of the weights, e.g. 0.9999 (official: none)")
    g.add_argument("--seed", type=int, default=0, help="seed of the data order, timesteps and noise (default 0)")
    g.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto = bfloat16 autocast on CUDA, float32 on the CPU")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet instead of using the fused kernels (~200 s warm-up; slower on an H100)")
    g.add_argument("--no-cuda-graph", action="store_true",
                   help="launch every kernel from Python instead of replaying each step from one CUDA graph (debugging)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--fresh", action="store_true", help="ignore checkpoints in the work folder and start over")
    g.add_argument("--tiny", action="store_true",
                   help="the tiny CPU preset (a small model, a few dozen steps): to try the pipeline, not for results")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _config(args: argparse.Namespace, stage: int, **extra):
    from ..train import TrainConfig

    values = dict(lr=args.lr, batch_size=args.batch_size, max_steps=args.steps, save_interval=args.save_interval,
                  ema_rate=args.ema, seed=args.seed, device=args.device, compile=args.compile,
                  cuda_graph=not args.no_cuda_graph, **extra)
    values = {k: v for k, v in values.items() if v is not None}
    if args.tiny:
        return TrainConfig.tiny(stage, **values)
    return TrainConfig(stage=stage, precision=args.precision, **values)


def _resolve_base(base: str) -> str:
    if base == "demo":
        from .. import synthetic

        return str(synthetic.demo_model_path())
    if not Path(base).is_file():
        from ..errors import InputError

        raise InputError(f"base model {base} does not exist; give a Stage 1 model (.safetensors or the official .pt)")
    return base


# ---------------------------------------------------------------------------------------------
def _add_finetune(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="Stage 2: make a personal model from ~20 photos of one person",
        description="Fine-tune a Stage 1 model on one person's album (the paper's Stage 2).",
        epilog=FINETUNE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("album", metavar="ALBUM", help="folder of photos, or a dataset made by `diffusionrig dataset`")
    p.add_argument("--base", required=True, metavar="MODEL",
                   help="the Stage 1 model: our .safetensors or the official modelNNNNNN.pt ('demo' = the demo model)")
    p.add_argument("--out", "-o", default="personal.safetensors", metavar="FILE",
                   help="the personal model to write (default personal.safetensors)")
    p.add_argument("--work-dir", default=None, metavar="DIR",
                   help="dataset, checkpoints, log.csv and loss.png (default: OUT without suffix + '_training')")
    p.add_argument("--freeze-encoder-bn", action="store_true",
                   help="keep the encoder's BatchNorm statistics fixed (the official recipe lets them adapt)")
    g = p.add_argument_group("album photos (when ALBUM is a folder of photos)")
    g.add_argument("--size", type=int, default=256, help="image size of the model (default 256)")
    g.add_argument("--no-align", action="store_true", help="the photos are FFHQ-aligned already")
    g.add_argument("--assets", metavar="DIR", default=None, help="face-rig assets folder ('demo' = synthetic world)")
    _training_options(p, stage=2)
    p.set_defaults(func=run_finetune)


def run_finetune(args: argparse.Namespace) -> int:
    from ..data import is_dataset
    from ..train import train

    out = Path(args.out)
    if out.suffix == "":
        out = out.with_suffix(".safetensors")
    work = Path(args.work_dir) if args.work_dir else out.with_name(out.stem + "_training")
    base = _resolve_base(args.base)
    album = Path(args.album)
    if is_dataset(album):
        dataset = album
    else:
        dataset = work / "dataset"
        if is_dataset(dataset) and not args.fresh:
            print(f"using the album dataset already built in {dataset}", file=sys.stderr)
        else:
            report = _build(album, dataset, args, use_mean_shape=True, align=not args.no_align, overwrite=True)
            print(report.summary(), file=sys.stderr)
    config = _config(args, stage=2, freeze_encoder_bn=args.freeze_encoder_bn or None)
    path = train(config, dataset, work, base=base, resume=not args.fresh, progress=not args.quiet, model_path=out)
    print(f"personal model: {path}\nloss curve: {work / 'loss.png'}")
    return 0


# ---------------------------------------------------------------------------------------------
def _add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="Stage 1: train the generic prior from a dataset (one or many GPUs)",
        description="Train a DiffusionRig model from scratch on a dataset of (photo, buffers) pairs "
                    "(the paper's Stage 1; the official model used FFHQ). Launch with torchrun for several GPUs.",
        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", metavar="DATASET", help="a dataset folder (`diffusionrig dataset` / `import-lmdb`)")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="run folder: checkpoints, logs, final model")
    p.add_argument("--init", default=None, metavar="MODEL", help="start from these weights instead of random ones")
    p.add_argument("--num-workers", type=int, default=None, metavar="N", help="data loading workers per GPU (default 4)")
    p.add_argument("--keep", type=int, default=2, metavar="K", help="checkpoints kept (default 2)")
    _training_options(p, stage=1)
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from ..train import train

    config = _config(args, stage=1, num_workers=args.num_workers, keep_checkpoints=args.keep)
    path = train(config, args.dataset, args.out, base=_resolve_base(args.init) if args.init else None,
                 resume=not args.fresh, progress=not args.quiet)
    print(f"model: {path}")
    return 0


# ---------------------------------------------------------------------------------------------
def _add_dataset(subparsers) -> None:
    p = subparsers.add_parser(
        "dataset", help="build a training dataset from a folder of photos",
        description="Detect, (optionally) FFHQ-align, fit DECA and render the buffers of every photo; store "
                    "(photo, buffers) pairs as safetensors shards with an index. Photos that fail are listed by "
                    "name in OUT/report.json.")
    p.add_argument("photos", metavar="PHOTOS", help="folder of photos")
    p.add_argument("out", metavar="OUT", help="dataset folder to create")
    p.add_argument("--mean-shape", action="store_true",
                   help="render every photo with the album's mean face shape (for a Stage 2 album)")
    p.add_argument("--align", action="store_true", help="FFHQ-align the photos first (raw album photos)")
    p.add_argument("--size", type=int, default=256, help="image size (default 256)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="photos fitted at once (default 8)")
    p.add_argument("--float16", action="store_true", help="store the buffers as float16 (half the disk space)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in OUT")
    p.add_argument("--assets", metavar="DIR", default=None, help="face-rig assets folder ('demo' = synthetic world)")
    p.add_argument("--device", default=None, help="torch device for fitting (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_dataset)


def _build(photos: Path, out: Path, args: argparse.Namespace, use_mean_shape: bool, align: bool, overwrite: bool):
    from ..data import build_dataset
    from ..pipeline import load_rig

    rig = load_rig(getattr(args, "assets", None), device=getattr(args, "device", None))
    return build_dataset(photos, out, rig, size=args.size, use_mean_shape=use_mean_shape, align=align,
                         batch_size=getattr(args, "fit_batch_size", 8), progress=not args.quiet,
                         overwrite=overwrite, buffer_dtype="float16" if getattr(args, "float16", False) else "float32")


def run_dataset(args: argparse.Namespace) -> int:
    args.fit_batch_size = args.batch_size
    report = _build(Path(args.photos), Path(args.out), args, use_mean_shape=args.mean_shape, align=args.align,
                    overwrite=args.overwrite)
    print(report.summary())
    return 0


# ---------------------------------------------------------------------------------------------
def _add_import(subparsers) -> None:
    p = subparsers.add_parser(
        "import-lmdb", help="convert a dataset made by the official create_data.py (LMDB)",
        description="Read an LMDB written by the official scripts/create_data.py (pickled tensors are read by a "
                    "loader that accepts tensors only) and write it as a dataset folder. mean_shape.pkl next to "
                    "data.mdb becomes the dataset's mean shape. Needs `pip install lmdb`.")
    p.add_argument("lmdb", metavar="LMDB", help="the .lmdb folder (data.mdb, lock.mdb[, mean_shape.pkl])")
    p.add_argument("out", metavar="OUT", help="dataset folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_import)


def run_import(args: argparse.Namespace) -> int:
    from ..data import import_official_lmdb

    report = import_official_lmdb(args.lmdb, args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(report.summary())
    return 0
