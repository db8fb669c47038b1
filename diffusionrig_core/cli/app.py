"""``diffusionrig app``: open the Gradio app in the browser.

With no real assets configured it runs on the synthetic demo world (made-up people, photos and a
small demo model), so the command works straight after ``pip install``. Imports stay inside ``run``.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "app", help="open the editing app in your browser (Gradio)",
        description="Serve the DiffusionRig app: edit light, expression and pose of a photo, fine-tune a "
                    "personal model from an album, mix and swap. Without real FLAME/DECA assets it runs on "
                    "the built-in synthetic demo world.")
    p.add_argument("--host", default=None, metavar="ADDR",
                   help="address to listen on (default $GRADIO_SERVER_NAME or 127.0.0.1; 0.0.0.0 serves your network)")
    p.add_argument("--port", type=int, default=None, metavar="N", help="port (default $GRADIO_SERVER_PORT or 7860)")
    p.add_argument("--share", action="store_true", help="also make a temporary public gradio.live link")
    p.add_argument("--model", type=Path, default=None, metavar="PATH", help="model to select first (.safetensors or official .pt)")
    p.add_argument("--models-dir", type=Path, action="append", default=[], metavar="DIR",
                   help="another folder of models to offer (repeatable)")
    p.add_argument("--assets", type=Path, default=None, metavar="DIR",
                   help="FLAME/DECA assets folder (default: $DIFFUSIONRIG_ASSETS or ~/.local/share/diffusionrig/assets)")
    p.add_argument("--device", default=None, metavar="DEV", help="cpu, cuda, cuda:1, mps (default: the GPU if there is one)")
    p.add_argument("--demo", action="store_true", help="use the synthetic demo world even if real assets exist")
    p.add_argument("--concurrency", type=int, default=None, metavar="N",
                   help="edits run at once; the others wait in a queue (default 1)")
    p.add_argument("--work-dir", type=Path, default=None, metavar="DIR",
                   help="where results and personal models are written (default: a temporary folder)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    return p


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError

    try:
        from gradio_app import AppConfig, launch
    except ImportError as exc:
        raise InputError(
            f"the app needs Gradio ({exc}); install it with: pip install -e \".[app]\"") from exc
    if args.model is not None and not args.model.exists():
        raise InputError(f"model file {args.model} does not exist")
    if args.assets is not None and not args.assets.is_dir():
        raise InputError(f"assets folder {args.assets} does not exist; `diffusionrig assets` lists what goes in it")
    given = dict(assets_dir=args.assets, model=args.model, models_dirs=args.models_dir or None,
                 device=args.device, demo=True if args.demo else None,
                 concurrency_limit=args.concurrency, work_dir=args.work_dir)
    # options given on the command line win over the DIFFUSIONRIG_* environment variables
    config = AppConfig.from_env(**{k: v for k, v in given.items() if v is not None})
    launch(config, host=args.host, port=args.port, share=args.share, open_browser=not args.no_browser)
    return 0
