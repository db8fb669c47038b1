"""``diffusionrig assets``: which face-rig files are present, and where to get and put the missing ones."""
from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "assets", help="list the FLAME/DECA files found and missing",
        description="List the face-rig files (FLAME 2020, its texture space, DECA's weights and data files) "
                    "found in the assets folder, and for each missing one where to get it and where to put it.")
    p.add_argument("--dir", metavar="DIR", default=None,
                   help="assets folder (default: $DIFFUSIONRIG_ASSETS or ~/.local/share/diffusionrig/assets)")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    from ..assets import check_assets, describe_assets_json, format_asset_report

    if args.json:
        print(describe_assets_json(args.dir))
    else:
        print(format_asset_report(dir=args.dir))
    statuses = check_assets(args.dir)
    # exit status 1 when something needed for rendering is missing, so scripts can check it
    return 0 if all(s.found for s in statuses if s.info.required_for == "render") else 1
