"""Stand-in for ``comfy.model_management``: CPU devices and a switchable interrupt flag."""
import torch


class InterruptProcessingException(BaseException):
    """As in ComfyUI: a BaseException, so ``except Exception`` cannot swallow a Cancel."""


_interrupt = False


def get_torch_device() -> torch.device:
    return torch.device("cpu")


def intermediate_device() -> torch.device:
    return torch.device("cpu")


def intermediate_dtype() -> torch.dtype:
    return torch.float32


def unet_offload_device() -> torch.device:
    return torch.device("cpu")


def soft_empty_cache(force: bool = False) -> None:
    pass


def interrupt_current_processing(value: bool = True) -> None:
    global _interrupt
    _interrupt = value


def processing_interrupted() -> bool:
    return _interrupt


def throw_exception_if_processing_interrupted() -> None:
    global _interrupt
    if _interrupt:
        _interrupt = False
        raise InterruptProcessingException()
