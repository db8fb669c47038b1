"""Write a synthetic world: ``python -m diffusionrig_core.synthetic OUT_DIR [--people N] [--photos M]``.

OUT_DIR gets ``assets/`` (FLAME-format files), ``people/person_NNN/photo_MMM.png`` with their
``.params.json`` sidecars and ``.txt`` landmarks, ``heldout/`` edit cases and ``world.json``.
The same arguments give the same files.
"""
from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffusionrig_core.synthetic", description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--people", type=int, default=8, help="number of people (default 8)")
    p.add_argument("--photos", type=int, default=8, help="photos per person (default 8)")
    p.add_argument("--heldout", type=int, default=1, help="held-out edit cases per person (default 1)")
    p.add_argument("--size", type=int, default=128, help="photo side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", default="small", choices=["tiny", "small", "medium"],
                   help="mesh/texture density of the head model (default small)")
    args = p.parse_args(argv)
    import torch

    from .photos import write_world

    torch.set_num_threads(1)
    start = time.perf_counter()
    path = write_world(args.out_dir, n_people=args.people, photos_per_person=args.photos, seed=args.seed,
                       size=args.size, heldout_per_person=args.heldout, resolution=args.resolution)
    print(f"wrote {path} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
