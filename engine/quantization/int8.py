"""Weight-only int8 ("int8"): a float checkpoint quantized at load, one symmetric scale per output channel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from engine.quantization.base import QuantizationConfig, quant_param
import ops.quant_matmul  # noqa: F401  (registers torch.ops.engine.int8_matmul)
from ops.quant_ref import INT8_MAX, quantize_int8

# Scales before a checkpoint sets them (dummy weights): any int8 times this is within +-1e-3, the
# range of the other dummy weights.
DUMMY_SCALE = 1e-3 / INT8_MAX


@dataclass
class Int8Config(QuantizationConfig):
    """Weight-only int8 of an fp16/bf16/fp32 checkpoint; nothing to configure."""

    name = "int8"

    @classmethod
    def from_config(cls, config: dict) -> "Int8Config":
        return cls()

    def get_linear_method(self, layer: nn.Module, prefix: str) -> "Int8LinearMethod":
        return Int8LinearMethod()


class Int8LinearMethod:
    """An int8 `weight` [out, in] and a `weight_scale` [out] in the activation dtype.

    Each checkpoint tensor is quantized as the loader receives it, before it is sharded, so the full-
    precision weight is never kept and a row-parallel rank's scales cover the whole input row.
    `weight_scale` is a buffer, not a parameter: no checkpoint tensor fills it, the weight's loader does.
    Column-parallel layers split the scales with their output rows; row-parallel ones keep them whole.
    """

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], weight_loader) -> None:
        def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return quantize_int8(weight, layer.weight_scale.dtype)

        scale = torch.full((sum(output_sizes),), DUMMY_SCALE)  # the default dtype: the model's
        create_weights_quantized_at_load(layer, "int8", input_size, "weight_scale", scale, quantize, weight_loader)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.engine.int8_matmul(x, layer.weight, layer.weight_scale, bias)


def create_weights_quantized_at_load(layer: nn.Module, method: str, input_size: int, scale_name: str,
                                     scale: torch.Tensor, quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                                     weight_loader) -> None:
    """An int8 `weight` [out, in] whose loader quantizes each float checkpoint tensor with `quantize`
    (-> int8 weight, per-row scale) and also loads the scale into the buffer `scale_name`, filled
    with `scale` (its dummy values) until then. Column-parallel layers split the scales with their
    output rows; row-parallel ones keep them whole (each row was quantized whole, before sharding)."""

    def load_quantized(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if not loaded_weight.is_floating_point():
            raise ValueError(f"{method} quantizes float weights at load, got {loaded_weight.dtype}")
        weight, row_scale = quantize(loaded_weight.to(param.device))
        weight_loader(param, weight, shard_id)
        weight_loader(getattr(layer, scale_name), row_scale, shard_id)

    quant_param(layer, "weight", (scale.shape[0], input_size), torch.int8, 1, 0, load_quantized)
    scale.input_dim, scale.output_dim = None, 0
    layer.register_buffer(scale_name, scale)
