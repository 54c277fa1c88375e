"""GPTQ (AutoGPTQ / GPTQModel checkpoints): 4-bit weights, per-group scales and zeros, act-order."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.models.layers import RowParallelLinear
from engine.quantization import swapab
from engine.quantization.base import QuantizationConfig, check_bits, check_divisible, config_value, quant_param
import ops.quant_matmul  # noqa: F401  (registers torch.ops.engine.gptq_matmul)
from ops.quant_ref import PACK_FACTOR, sort_by_group

GPTQ_GROUP_SIZES = (32, 64, 128, -1)  # -1: one group over the whole input
GPTQ_FORMATS = ("gptq", "gptq_v2")  # v1 stores zero - 1 (AutoGPTQ's historical off-by-one), v2 the zero


@dataclass
class GPTQConfig(QuantizationConfig):
    """qweight int32 [in/8, out], qzeros int32 [groups, out/8], scales fp16 [groups, out], g_idx int32 [in]."""

    group_size: int  # inputs sharing one scale and zero; -1 for one group per output
    desc_act: bool  # act-order: inputs were quantized in a permuted order, g_idx says each one's group
    sym: bool  # symmetric (every zero is 8) or asymmetric; both store qzeros, which is all we read
    checkpoint_format: str = "gptq"
    name = "gptq"

    @classmethod
    def from_config(cls, config: dict) -> "GPTQConfig":
        check_bits("gptq", config_value(config, ("bits",)))
        group_size = config_value(config, ("group_size",))
        if group_size not in GPTQ_GROUP_SIZES:
            raise ValueError(f"gptq group_size {group_size} is not supported; supported: "
                             f"{', '.join(map(str, GPTQ_GROUP_SIZES))}")
        checkpoint_format = str(config.get("checkpoint_format", "gptq")).lower()
        if checkpoint_format not in GPTQ_FORMATS:
            raise ValueError(f"gptq checkpoint_format {checkpoint_format!r} is not supported; supported: "
                             f"{', '.join(GPTQ_FORMATS)}")
        return cls(group_size, bool(config.get("desc_act", False)), bool(config.get("sym", True)), checkpoint_format)

    def get_linear_method(self, layer: nn.Module, prefix: str) -> "GPTQLinearMethod":
        return GPTQLinearMethod(self)


class GPTQLinearMethod:
    """Creates a layer's GPTQ tensors (this rank's share) and multiplies by them.

    Column-parallel layers split the output dim. Row-parallel ones split qweight and g_idx along the
    input dim; scales and zeros go with them when each rank's inputs are whole groups in order, and
    are kept whole on every rank when they are not (act-order, or one group over all inputs).
    Fused q/k/v (gate/up) parts share their input, hence one act-order g_idx: it is checked.

    Act-order layers are sorted by group once loaded (`process_weights_after_loading`), so that they
    run the kernels of layers without it.
    """

    def __init__(self, config: GPTQConfig):
        self.config = config

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], weight_loader) -> None:
        config = self.config
        row_parallel = isinstance(layer, RowParallelLinear) and layer.tp_size > 1
        full_input = layer.input_size if row_parallel else input_size
        group_size = config.group_size if config.group_size != -1 else full_input
        check_divisible(input_size, PACK_FACTOR, "input size per rank", "gptq packs 8 inputs per int32")
        check_divisible(full_input, group_size, "input size", "the gptq group size")
        for size in output_sizes:
            check_divisible(size, PACK_FACTOR, "output size per rank", "gptq packs 8 zeros per int32")
        shard_groups = row_parallel and not config.desc_act and config.group_size != -1
        if shard_groups:
            check_divisible(input_size, group_size, "input size per rank", "the gptq group size")
        groups = (input_size if shard_groups else full_input) // group_size
        groups_dim = 0 if shard_groups else None
        out = sum(output_sizes)
        quant_param(layer, "qweight", (input_size // PACK_FACTOR, out), torch.int32, 0, 1, weight_loader,
                    packed_dim=0, pack_factor=PACK_FACTOR)
        quant_param(layer, "qzeros", (groups, out // PACK_FACTOR), torch.int32, groups_dim, 1, weight_loader,
                    packed_dim=1, pack_factor=PACK_FACTOR)
        quant_param(layer, "scales", (groups, out), torch.float16, groups_dim, 1, weight_loader)
        first_group = layer.tp_rank * groups if shard_groups else 0

        def load_g_idx(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
            previous = param.data.clone() if getattr(param, "loaded", False) else None
            weight_loader(param, loaded_weight, shard_id)
            param.data -= first_group  # this rank's scales and zeros start at its first group
            if previous is not None and not torch.equal(previous, param.data):
                raise ValueError("the fused parts of this layer have different g_idx (act-order); they must share one")
            param.loaded = True

        g_idx = quant_param(layer, "g_idx", (input_size,), torch.int32, 0 if row_parallel else None, None, load_g_idx)
        first_input = layer.tp_rank * input_size if row_parallel else 0
        with torch.no_grad():  # inputs in order, for dummy weights (a checkpoint overwrites it)
            g_idx.copy_(torch.arange(first_input, first_input + input_size) // group_size - first_group)
        layer.act_order = config.desc_act  # until process_weights_after_loading sorts the inputs by group
        layer.register_buffer("input_order", None)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Act-order, sorted once (`sort_by_group`): qweight's input rows and g_idx reordered by group
        and each matmul's x gathered in that order (`input_order`), so the kernels find a K-tile's
        group from its index, as without act-order, instead of gathering a group for every input row
        (on the H100 that gather ran 22-45x slower than the planar kernel at one row and 4-7x at 256
        rows over Llama-3.1-8B's four shapes: gptq-act-g128 against gptq-g128 in perf/quant_bench.py).
        Left as it is where the sorted inputs are not whole groups in order (a row-parallel rank's
        share)."""
        if layer.act_order:
            result = sort_by_group(layer.qweight.data, layer.g_idx.data, self.config.group_size)
            if result is not None:
                qweight, groups, order = result
                if order is not None:
                    layer.qweight = nn.Parameter(qweight, requires_grad=False)
                    layer.input_order = order
                layer.g_idx = nn.Parameter(groups, requires_grad=False)
                layer.act_order = False
        self._maybe_repack_swapab(layer)

    def _maybe_repack_swapab(self, layer: nn.Module) -> None:
        """ENGINE_SWAPAB_GEMM (`engine.quantization.swapab`): layers whose groups are the inputs in order (no
        act-order left) keep qweight in the swap-AB GEMM's order, instead (`1`) or beside GPTQ's (`auto`)."""
        if not (swapab.ENABLED or getattr(layer, "swapab_copy", False)) or layer.act_order:
            return
        K = layer.qweight.shape[0] * PACK_FACTOR
        group_size = self.config.group_size if self.config.group_size != -1 else K
        in_order = torch.arange(K, device=layer.g_idx.device) // group_size
        if layer.scales.shape[0] == K // group_size and torch.equal(layer.g_idx.data.long(), in_order):
            swapab.maybe_repack(layer, group_size)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        config = self.config
        if layer.input_order is not None:
            x = x.index_select(-1, layer.input_order)
        if getattr(layer, "swapab", False):
            return torch.ops.engine.swapab_matmul(x, layer.qweight, layer.qzeros, layer.scales, layer.swapab_group,
                                                  config.checkpoint_format == "gptq", bias)
        if getattr(layer, "swapab_packed", None) is not None:
            return torch.ops.engine.dual_4bit_matmul(x, layer.qweight, layer.swapab_packed, layer.qzeros, layer.scales,
                                                     layer.swapab_group, config.checkpoint_format == "gptq", bias)
        return torch.ops.engine.gptq_matmul(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, config.group_size,
                                            layer.act_order, config.checkpoint_format == "gptq", bias)
