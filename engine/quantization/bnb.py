"""bitsandbytes LLM.int8() ("bitsandbytes"): int8 weights with one absmax per output row, multiplied
by bitsandbytes' own int8 matmul, whose activation columns above `threshold` (outliers) go through a
float matmul instead. Either a float checkpoint quantized at load (`quantization="bitsandbytes"`),
or a checkpoint transformers saved with `BitsAndBytesConfig(load_in_8bit=True)` (auto-detected from
its `quantization_config`). bitsandbytes is an optional dependency: `pip install 'engine[bnb]'`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch
from torch import nn

import ops.quant_matmul  # noqa: F401  (registers torch.ops.engine.bnb_int8_matmul)
from engine.quantization.base import QuantizationConfig, config_value, quant_param
from engine.quantization.int8 import create_weights_quantized_at_load

DEFAULT_THRESHOLD = 6.0  # transformers' BitsAndBytesConfig default llm_int8_threshold
DUMMY_SCB = 1e-3  # absmax per row before a checkpoint sets it (dummy weights): weights within +-1e-3
ROW_FORMAT = 0  # the weight_format bitsandbytes saves for row-major int8 ("row"), the only one it loads


@dataclass
class BitsAndBytesConfig(QuantizationConfig):
    """LLM.int8(): weight int8 [out, in], SCB float32 [out] (max |w| of each row: w = weight * SCB / 127)."""

    threshold: float = DEFAULT_THRESHOLD  # llm_int8_threshold: |activation| above it makes its column an outlier
    skip_modules: list[str] = field(default_factory=list)  # llm_int8_skip_modules: layers left unquantized
    prequantized: bool = False  # the checkpoint holds int8 weights and SCB; else floats, quantized at load
    name = "bitsandbytes"

    def __post_init__(self) -> None:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("quantization 'bitsandbytes' needs the bitsandbytes package: pip install 'engine[bnb]'")

    @classmethod
    def from_config(cls, config: dict) -> "BitsAndBytesConfig":
        """A transformers-saved checkpoint's quantization_config."""
        if config_value(config, ("load_in_4bit", "_load_in_4bit"), False):
            raise ValueError("bitsandbytes 4-bit (load_in_4bit) is not supported; supported: load_in_8bit")
        if not config_value(config, ("load_in_8bit", "_load_in_8bit"), False):
            raise ValueError("bitsandbytes quantization_config without load_in_8bit is not supported; "
                             "supported: load_in_8bit")
        if config.get("llm_int8_has_fp16_weight"):
            raise ValueError("bitsandbytes with llm_int8_has_fp16_weight (training) is not supported; supported: "
                             "int8 weights")
        return cls(float(config.get("llm_int8_threshold", DEFAULT_THRESHOLD)),
                   list(config.get("llm_int8_skip_modules") or []), prequantized=True)

    def get_linear_method(self, layer: nn.Module, prefix: str) -> "BitsAndBytesLinearMethod | None":
        if any(module in prefix for module in self.skip_modules):
            return None
        return BitsAndBytesLinearMethod(self)


def quantize_llm_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float weight [out, in] -> (int8 [out, in], SCB float32 [out]), as bitsandbytes' Int8Params does
    (from the fp16 weight): the same integers transformers' load_in_8bit makes."""
    import bitsandbytes.functional as bnb_functional

    weight, scb, _ = bnb_functional.int8_vectorwise_quant(weight.contiguous().to(torch.float16))
    return weight, scb


class BitsAndBytesLinearMethod:
    """An int8 `weight` [out, in] and `SCB` [out] float32, multiplied by `torch.ops.engine.bnb_int8_matmul`.

    Quantized at load: like int8, each float checkpoint tensor is quantized as the loader receives it
    and `SCB` is a buffer its loader fills. Pre-quantized: `weight` and `SCB` are checkpoint tensors,
    and transformers' per-layer `weight_format` (optional) is checked to be row-major. Either way
    column-parallel layers split SCB with their rows; row-parallel ones keep it whole.
    """

    # bitsandbytes looks for outlier columns with `if outliers.any()`: a host read, not capturable.
    CUDA_GRAPH_SAFE = False

    def __init__(self, config: BitsAndBytesConfig):
        self.config = config

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], weight_loader) -> None:
        out = sum(output_sizes)
        if not self.config.prequantized:
            scb = torch.full((out,), DUMMY_SCB, dtype=torch.float32)
            create_weights_quantized_at_load(layer, "bitsandbytes", input_size, "SCB", scb, quantize_llm_int8,
                                             weight_loader)
            return
        quant_param(layer, "weight", (out, input_size), torch.int8, 1, 0, weight_loader)
        quant_param(layer, "SCB", (out,), torch.float32, None, 0, weight_loader)

        def check_row_format(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
            if int(loaded_weight) != ROW_FORMAT:
                raise ValueError(f"bitsandbytes weight_format {int(loaded_weight)} is not supported; "
                                 f"supported: {ROW_FORMAT} (row-major)")

        weight_format = quant_param(layer, "weight_format", (), torch.uint8, None, None, check_row_format)
        weight_format.optional = True  # older checkpoints do not store it
        weight_format.data.fill_(ROW_FORMAT)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.engine.bnb_int8_matmul(x, layer.weight, layer.SCB, self.config.threshold, bias)
