"""ModelConfig (a dataclass that round-trips through JSON) and the DiffusionRig module.

``DiffusionRig`` = ``denoisingUNet`` (unet.UNetModel) + ``encoder`` (a ResNet whose ``fc`` gives the
global latent). The two attribute names are the official state-dict prefixes; ``denoisingUNet`` is
registered first so ``state_dict()`` lists keys in the official order.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .encoder import ResNet
from .errors import InputError
from .unet import UNetModel

# Default channel multipliers per image size when the official ``channel_mult`` is "".
DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}

# Keys of the official create_model_and_diffusion that only concern the diffusion or are unused.
_OFFICIAL_NON_MODEL_KEYS = {
    "diffusion_steps", "noise_schedule", "timestep_respacing", "use_kl", "predict_xstart",
    "rescale_timesteps", "rescale_learned_sigmas", "p2_weight", "p2_gamma", "p2_k", "use_checkpoint",
    "use_fp16",
}


def default_channel_mult(image_size: int) -> tuple[float, ...]:
    if image_size not in DEFAULT_CHANNEL_MULT:
        raise InputError(
            f"no default channel multipliers for image size {image_size}; "
            f"give channel_mult explicitly or use one of {sorted(DEFAULT_CHANNEL_MULT)}"
        )
    return DEFAULT_CHANNEL_MULT[image_size]


def _parse_numbers(value: Any, cast: type) -> tuple:
    if isinstance(value, str):
        return tuple(cast(v) for v in value.split(",") if v.strip())
    if isinstance(value, (int, float)):
        return (cast(value),)
    return tuple(cast(v) for v in value)


def _clean_mult(values: tuple) -> tuple[float, ...]:
    # Keep integral multipliers as ints so the JSON reads "1, 2" rather than "1.0, 2.0".
    return tuple(int(v) if float(v).is_integer() else float(v) for v in values)


@dataclass
class ModelConfig:
    """Architecture of a DiffusionRig model (the official defaults are the 256 model)."""

    image_size: int = 256
    num_channels: int = 128
    num_res_blocks: int = 2
    channel_mult: tuple[float, ...] = field(default_factory=lambda: DEFAULT_CHANNEL_MULT[256])
    attention_resolutions: tuple[int, ...] = (16,)  # feature-map sizes, as the official option
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    dropout: float = 0.1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_new_attention_order: bool = False
    latent_dim: int = 64
    in_channels: int = 12
    encoder_type: str = "resnet18"
    learn_sigma: bool = False
    encoder_width: int = 64  # ResNet stem width: 64 official; narrower only for the small synthetic demo model

    def __post_init__(self) -> None:
        if self.channel_mult in ("", None, ()):
            self.channel_mult = default_channel_mult(self.image_size)
        self.channel_mult = _clean_mult(_parse_numbers(self.channel_mult, float))
        self.attention_resolutions = _parse_numbers(self.attention_resolutions, int)
        if self.encoder_type not in ("resnet18", "resnet50"):
            raise InputError(f"encoder_type must be 'resnet18' or 'resnet50', got {self.encoder_type!r}")
        if int(self.encoder_width) < 1:
            raise InputError(f"encoder_width must be a positive number of channels, got {self.encoder_width!r}")
        self.encoder_width = int(self.encoder_width)
        for mult in self.channel_mult:
            width = int(mult * self.num_channels)
            if width % 32:
                raise InputError(
                    f"level width {width} (= {mult} x num_channels {self.num_channels}) is not divisible by 32, "
                    "which GroupNorm(32) needs"
                )

    # ---- derived values -------------------------------------------------------------------
    @property
    def out_channels(self) -> int:
        return 6 if self.learn_sigma else 3

    @property
    def attention_ds(self) -> tuple[int, ...]:
        """Downsample factors of the attention levels (official: image_size // resolution)."""
        return tuple(self.image_size // r for r in self.attention_resolutions)

    # ---- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_resolutions"] = list(self.attention_resolutions)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InputError(f"unknown model config keys {unknown}; expected a subset of {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "ModelConfig":
        return cls.from_dict(json.loads(s))

    @classmethod
    def from_official(cls, **kwargs: Any) -> "ModelConfig":
        """From the keyword arguments of the official ``create_model_and_diffusion``.

        Accepts the official string forms (``channel_mult=""`` or ``"1,2,3"``,
        ``attention_resolutions="32,16"``) and ignores the diffusion-only keys.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        model_kwargs = {k: v for k, v in kwargs.items() if k not in _OFFICIAL_NON_MODEL_KEYS}
        unknown = sorted(set(model_kwargs) - names)
        if unknown:
            raise InputError(f"unknown official model options {unknown}")
        if model_kwargs.get("channel_mult", "") == "":
            model_kwargs["channel_mult"] = default_channel_mult(int(model_kwargs.get("image_size", 256)))
        return cls(**model_kwargs)

    @classmethod
    def tiny(cls) -> "ModelConfig":
        """A small model for tests of other modules (64 px, ~1.3 M UNet parameters + ResNet-18)."""
        return cls(
            image_size=64, num_channels=32, num_res_blocks=1, channel_mult=(1, 2),
            attention_resolutions=(32,), dropout=0.0,
        )

    def unet_kwargs(self) -> dict[str, Any]:
        return dict(
            image_size=self.image_size,
            in_channels=self.in_channels,
            model_channels=self.num_channels,
            out_channels=self.out_channels,
            num_res_blocks=self.num_res_blocks,
            attention_resolutions=self.attention_ds,
            latent_dim=self.latent_dim,
            dropout=self.dropout,
            channel_mult=self.channel_mult,
            num_heads=self.num_heads,
            num_head_channels=self.num_head_channels,
            num_heads_upsample=self.num_heads_upsample,
            use_scale_shift_norm=self.use_scale_shift_norm,
            resblock_updown=self.resblock_updown,
            use_new_attention_order=self.use_new_attention_order,
        )


class DiffusionRig(nn.Module):
    """UNet denoiser + global encoder.

    ``model(x_t, t, buffers, latent)`` returns the predicted noise; with ``latent=None`` the latent is
    computed from ``x_start`` inside the call, as official training does (so BatchNorm sees the batch).
    """

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config if config is not None else ModelConfig()
        self.denoisingUNet = UNetModel(**self.config.unet_kwargs())
        self.encoder = ResNet(self.config.encoder_type, num_outputs=self.config.latent_dim,
                              width=self.config.encoder_width)
        self.mean_shape: torch.Tensor | None = None  # album mean DECA shape (1, 100), if known
        self.metadata: dict[str, Any] = {}

    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) image in [-1, 1] -> (B, latent_dim) global latent. No normalisation, no resize."""
        return self.encoder(x0.to(self.encoder.conv1.weight.dtype))

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        buffers: torch.Tensor,
        latent: torch.Tensor | None = None,
        x_start: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if latent is None:
            if x_start is None:
                raise InputError("DiffusionRig needs either a latent or the clean image x_start to encode")
            latent = self.encode(x_start)
        return self.denoisingUNet(x_t, t, buffers, latent)
