"""Input-shape checks shared by the architecture families."""

from __future__ import annotations

from ..errors import ConfigError


def image_channels(arch: str, input_shape: tuple[int, ...]) -> int:
    """The channel count of image inputs (C, H, W); a clear error for vector data."""
    if len(input_shape) != 3:
        raise ConfigError(f"{arch} needs image inputs (C, H, W), got shape {tuple(input_shape)}; "
                          "for vector data (e.g. dataset=synthetic) use an MLP "
                          "(student=mlp_small teacher=mlp_large)")
    return int(input_shape[0])
