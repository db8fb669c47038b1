"""``diffusionrig convert``: an official ``modelNNNNNN.pt`` -> our ``.safetensors`` (config inside)."""
from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert", help="convert an official DiffusionRig .pt checkpoint to .safetensors",
        description="Read an official DiffusionRig checkpoint (a state dict saved with torch.save), infer its "
                    "configuration from the tensor names and shapes, and write a .safetensors file that carries "
                    "the configuration, so it loads without any option. Attention heads cannot be read from the "
                    "weights: the official default is 1; give --num-heads/--num-head-channels if the model was "
                    "trained with others.")
    p.add_argument("src", metavar="SRC.pt", help="official checkpoint (or one of ours)")
    p.add_argument("dst", metavar="DST.safetensors", help="file to write (replaced atomically)")
    p.add_argument("--num-heads", type=int, default=None, metavar="N", help="attention heads (official default 1)")
    p.add_argument("--num-head-channels", type=int, default=None, metavar="C",
                   help="channels per attention head, instead of --num-heads")
    p.add_argument("--new-attention-order", action="store_true",
                   help="the model was trained with use_new_attention_order=True")
    p.add_argument("--image-size", type=int, default=None, metavar="S",
                   help="training image size (default: inferred from the channel multipliers)")
    p.add_argument("--mean-shape", metavar="PATH", default=None,
                   help="album mean shape to store with the model (mean_shape.pkl of an official album LMDB, .npy or .safetensors)")
    return p


def _read_mean_shape(path: str):
    import numpy as np
    import torch

    if path.endswith(".npy"):
        return torch.from_numpy(np.load(path, allow_pickle=False)).float().reshape(1, -1)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return next(iter(load_file(path).values())).float().reshape(1, -1)
    from ..data import load_official_mean_shape  # the official mean_shape.pkl (a pickled CUDA tensor)

    return load_official_mean_shape(path)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_model, save_model

    overrides = {}
    if args.num_heads is not None:
        overrides["num_heads"] = args.num_heads
    if args.num_head_channels is not None:
        overrides["num_head_channels"] = args.num_head_channels
    if args.new_attention_order:
        overrides["use_new_attention_order"] = True
    if args.image_size is not None:
        overrides["image_size"] = args.image_size
    model = load_model(args.src, **overrides)
    if args.mean_shape:
        model.mean_shape = _read_mean_shape(args.mean_shape)
    from pathlib import Path

    save_model(model, args.dst, metadata={"converted_from": Path(args.src).name})
    c = model.config
    print(f"wrote {args.dst}: image {c.image_size}, channels {c.num_channels}, mult {list(c.channel_mult)}, "
          f"res blocks {c.num_res_blocks}, attention {list(c.attention_resolutions)} (heads {c.num_heads}), "
          f"latent {c.latent_dim}, {c.encoder_type}" + (", mean shape included" if model.mean_shape is not None else ""))
    return 0
