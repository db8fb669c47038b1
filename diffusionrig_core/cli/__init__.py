"""The ``diffusionrig`` command.

Each subcommand lives in its own module of this package, which exposes either
``add_parser(subparsers) -> parser`` plus ``run(args) -> int``, or ``add_parsers(subparsers)``
registering several subcommands with ``set_defaults(func=...)``. Those modules import nothing
heavy at the top, so ``diffusionrig --help`` stays instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# order = order in --help
_MODULES = ("app", "edit", "finetune", "train", "assets", "convert", "bench", "demo")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="diffusionrig",
        description="Edit a portrait's lighting, expression and head pose with DiffusionRig.",
    )
    parser.add_argument("--version", action="version", version=f"diffusionrig {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _MODULES:
        try:
            module = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # a subcommand not built yet
            raise
        if hasattr(module, "add_parsers"):
            module.add_parsers(sub)
        else:
            module.add_parser(sub).set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    from ..errors import DiffusionRigError

    try:
        return int(args.func(args) or 0)
    except DiffusionRigError as exc:
        # a mistake the user can fix: say it plainly, without a traceback
        print(f"diffusionrig {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
