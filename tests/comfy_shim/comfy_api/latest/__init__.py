"""Stand-in for ``comfy_api.latest``: ``ComfyExtension`` and the ``io`` schema classes."""
from abc import ABC, abstractmethod

from . import io

IO = io


class ComfyExtension(ABC):
    async def on_load(self) -> None:
        pass

    @abstractmethod
    async def get_node_list(self) -> list:
        ...


__all__ = ["ComfyExtension", "io", "IO"]
