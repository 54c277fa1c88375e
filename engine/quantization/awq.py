"""AWQ (AutoAWQ "GEMM" checkpoints): 4-bit weights with per-group scales and zero points."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from engine.quantization import swapab
from engine.quantization.base import QuantizationConfig, check_bits, check_divisible, config_value, quant_param
import ops.quant_matmul  # noqa: F401  (registers torch.ops.engine.awq_matmul)
from ops.quant_ref import PACK_FACTOR, awq_to_gptq

AWQ_GROUP_SIZES = (32, 64, 128)


@dataclass
class AWQConfig(QuantizationConfig):
    """AutoAWQ GEMM: qweight int32 [in, out/8], qzeros int32 [in/group, out/8], scales fp16 [in/group, out]."""

    group_size: int  # inputs sharing one scale and zero
    modules_to_not_convert: list[str] = field(default_factory=list)  # layers left unquantized (name parts)
    name = "awq"

    @classmethod
    def from_config(cls, config: dict) -> "AWQConfig":
        check_bits("awq", config_value(config, ("bits", "w_bit")))
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"awq version {version!r} is not supported; supported: 'gemm' (AutoAWQ's default)")
        if not config_value(config, ("zero_point",), True):
            raise ValueError("awq without zero points (zero_point: false) is not supported; supported: zero_point true")
        group_size = config_value(config, ("group_size", "q_group_size"))
        if group_size not in AWQ_GROUP_SIZES:
            raise ValueError(f"awq group_size {group_size} is not supported; supported: "
                             f"{', '.join(map(str, AWQ_GROUP_SIZES))}")
        return cls(group_size, list(config.get("modules_to_not_convert") or []))

    def get_linear_method(self, layer: nn.Module, prefix: str) -> "AWQLinearMethod | None":
        if any(module in prefix for module in self.modules_to_not_convert):
            return None
        return AWQLinearMethod(self)


class AWQLinearMethod:
    """Creates a layer's AWQ tensors (this rank's share) and multiplies by them.

    Column-parallel layers split the output dim (packed 8 per int32 in qweight/qzeros), row-parallel
    ones the input dim, whose groups go with it: each rank's input slice must hold whole groups.
    """

    def __init__(self, config: AWQConfig):
        self.config = config

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], weight_loader) -> None:
        group_size = self.config.group_size
        check_divisible(input_size, group_size, "input size per rank", "the awq group size")
        for size in output_sizes:
            check_divisible(size, PACK_FACTOR, "output size per rank", "awq packs 8 outputs per int32")
        out, groups = sum(output_sizes), input_size // group_size
        quant_param(layer, "qweight", (input_size, out // PACK_FACTOR), torch.int32, 0, 1, weight_loader,
                    packed_dim=1, pack_factor=PACK_FACTOR)
        quant_param(layer, "qzeros", (groups, out // PACK_FACTOR), torch.int32, 0, 1, weight_loader,
                    packed_dim=1, pack_factor=PACK_FACTOR)
        quant_param(layer, "scales", (groups, out), torch.float16, 0, 1, weight_loader)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Repack into GPTQ's layout (`awq_to_gptq`): the same weight, and the layout whose decode
        kernel reads its nibble planes without interleaving them (ops.triton_quant's planar kernel)."""
        qweight, qzeros = awq_to_gptq(layer.qweight.data, layer.qzeros.data)
        layer.qweight = nn.Parameter(qweight, requires_grad=False)
        layer.qzeros = nn.Parameter(qzeros, requires_grad=False)
        inputs = torch.arange(qweight.shape[0] * PACK_FACTOR, dtype=torch.int32, device=qweight.device)
        layer.register_buffer("g_idx", inputs // self.config.group_size)  # read by the CPU reference only
        layer.awq_repacked = True
        swapab.maybe_repack(layer, self.config.group_size)  # ENGINE_SWAPAB_GEMM (engine.quantization.swapab)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if getattr(layer, "swapab", False):
            return torch.ops.engine.swapab_matmul(x, layer.qweight, layer.qzeros, layer.scales, self.config.group_size,
                                                  False, bias)
        if getattr(layer, "swapab_packed", None) is not None:
            return torch.ops.engine.dual_4bit_matmul(x, layer.qweight, layer.swapab_packed, layer.qzeros, layer.scales,
                                                     self.config.group_size, False, bias)
        if getattr(layer, "awq_repacked", False):
            return torch.ops.engine.gptq_matmul(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx,
                                                self.config.group_size, False, False, bias)
        return torch.ops.engine.awq_matmul(x, layer.qweight, layer.qzeros, layer.scales, self.config.group_size, bias)
