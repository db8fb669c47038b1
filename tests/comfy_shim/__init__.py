"""A minimal fake of the ComfyUI modules the DiffusionRig nodes import, for tests without ComfyUI.

This folder holds top-level stand-ins (``comfy``, ``comfy_api``, ``folder_paths``). They go on
``sys.path`` only inside ``loaded_pack``, which also loads the repository root as a custom-node
package the way ComfyUI does (a package named after the folder, relative imports inside), and
takes everything out again afterwards so no other test ever sees a fake ``comfy`` module.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator

SHIM_DIR = Path(__file__).resolve().parent
REPO = SHIM_DIR.parents[1]
PACK_NAME = "diffusionrig_comfy_pack"
_FAKE_TOPS = ("comfy", "comfy_api", "folder_paths")


def _owned(name: str) -> bool:
    return any(name == top or name.startswith(top + ".") for top in _FAKE_TOPS + (PACK_NAME,))


@contextlib.contextmanager
def loaded_pack(root: Path) -> Iterator[ModuleType]:
    """The pack imported against the fake ComfyUI, with models/input/output folders under ``root``."""
    clashes = [name for name in sys.modules if _owned(name)]
    if clashes:
        raise RuntimeError(f"modules {clashes[:5]} are already imported; the ComfyUI shim cannot be used here")
    sys.path.insert(0, str(SHIM_DIR))
    try:
        import folder_paths

        folder_paths.reset(str(root))
        spec = importlib.util.spec_from_file_location(PACK_NAME, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        pack = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = pack
        spec.loader.exec_module(pack)
        yield pack
    finally:
        sys.path.remove(str(SHIM_DIR))
        for name in [n for n in sys.modules if _owned(n)]:
            del sys.modules[name]


def node_classes(pack: ModuleType) -> list[type]:
    """What ComfyUI gets from the pack: ``await comfy_entrypoint()`` then ``get_node_list()``."""

    async def load():
        extension = await pack.comfy_entrypoint()
        await extension.on_load()
        return await extension.get_node_list()

    return asyncio.run(load())
