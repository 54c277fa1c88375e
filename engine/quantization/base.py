"""What every quantization method shares: the config interface and how its parameters are made."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

SUPPORTED_BITS = (4,)


class QuantizationConfig:
    """A checkpoint's `quantization_config`, parsed; hands each linear layer its `LinearMethod`."""

    name: str = ""

    @classmethod
    def from_config(cls, config: dict) -> "QuantizationConfig":
        raise NotImplementedError

    def get_linear_method(self, layer: nn.Module, prefix: str) -> Any:
        raise NotImplementedError


def config_value(config: dict, keys: tuple[str, ...], default: Any = None) -> Any:
    """The first of `keys` present in `config` (formats name the same setting differently)."""
    for key in keys:
        if key in config:
            return config[key]
    if default is not None:
        return default
    raise ValueError(f"quantization_config has none of the keys {', '.join(keys)}")


def check_bits(method: str, bits: Any) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{method} with {bits} bits is not supported; supported: "
                         f"{', '.join(map(str, SUPPORTED_BITS))} bits")
    return bits


def check_divisible(size: int, divisor: int, what: str, why: str) -> None:
    if size % divisor:
        raise ValueError(f"{what} ({size}) is not divisible by {divisor} ({why})")


def quant_param(layer: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype, input_dim: int | None,
                output_dim: int | None, weight_loader, packed_dim: int | None = None, pack_factor: int = 1) -> nn.Parameter:
    """Register an empty parameter on `layer`, tagged for the layers' sharding loaders.

    `packed_dim` is the dim along which `pack_factor` values share one stored element: shard offsets
    along it are divided by `pack_factor`.
    """
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    param.input_dim, param.output_dim, param.weight_loader = input_dim, output_dim, weight_loader
    param.packed_dim, param.pack_factor = packed_dim, pack_factor
    layer.register_parameter(name, param)
    return param
