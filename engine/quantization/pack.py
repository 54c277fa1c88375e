"""Writing AWQ and GPTQ checkpoints from float ones (for tests: no quantized weights can be downloaded).

`quantize_int4` fake-quantizes a weight (round-to-nearest per group, not AWQ's or GPTQ's search: the
on-disk layout is what is tested, not the quantization quality); `pack_awq` / `pack_gptq` write its
integers in each format's documented layout (see `ops.quant_ref`, which reads them back), and
`write_quantized_checkpoint` turns every decoder linear weight of a float checkpoint into them.
`write_int8_dequantized_checkpoint` writes the float weights that int8 (quantized at load) stands for.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from ops.quant_ref import AWQ_ORDER, PACK_FACTOR, dequantize_int8, pack_int4, quantize_int8  # noqa: F401 (pack_int4: here too)

MAX_Q = 15


@dataclass
class Int4Weight:
    """A weight as 4-bit integers with per-group scales and zeros: w[i, o] = (q - zero) * scale."""

    q: torch.Tensor  # int32 [in, out], values 0..15
    zeros: torch.Tensor  # int32 [groups, out]
    scales: torch.Tensor  # float16 [groups, out]
    g_idx: torch.Tensor  # int32 [in]: each input's group

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in] (HF layout) these integers stand for, exactly."""
        groups = self.g_idx.long()
        return ((self.q - self.zeros[groups]).float() * self.scales[groups].float()).T.contiguous()


def quantize_int4(weight: torch.Tensor, group_size: int, *, symmetric: bool = False, min_zero: int = 0,
                  act_order: torch.Tensor | None = None) -> Int4Weight:
    """Round `weight` [out, in] to 4 bits per group of `group_size` inputs (-1: all inputs).

    `act_order` (a permutation of the inputs) groups inputs in that order, as GPTQ's act-order does;
    `min_zero=1` keeps zeros representable in GPTQ's v1 format, which stores zero - 1.
    """
    out_features, in_features = weight.shape
    group_size = in_features if group_size == -1 else group_size
    order = act_order if act_order is not None else torch.arange(in_features)
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[order] = (torch.arange(in_features) // group_size).to(torch.int32)
    w = weight.T.float()  # [in, out]
    num_groups = in_features // group_size
    low = torch.stack([w[g_idx == g].amin(0) for g in range(num_groups)]).clamp(max=0)
    high = torch.stack([w[g_idx == g].amax(0) for g in range(num_groups)]).clamp(min=0)
    if symmetric:
        scales = (torch.maximum(-low, high) * 2 / MAX_Q).clamp(min=1e-4).half()
        zeros = torch.full_like(scales, 8, dtype=torch.int32)
    else:
        scales = ((high - low) / MAX_Q).clamp(min=1e-4).half()
        zeros = torch.round(-low / scales.float()).clamp(min_zero, MAX_Q).to(torch.int32)
    groups = g_idx.long()
    q = torch.round(w / scales[groups].float() + zeros[groups]).clamp(0, MAX_Q).to(torch.int32)
    return Int4Weight(q, zeros, scales, g_idx)


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """[rows, out] -> int32 [rows, out/8] in AutoAWQ's interleaved order."""
    rows, cols = values.shape
    interleaved = values.view(rows, cols // PACK_FACTOR, PACK_FACTOR)[:, :, list(AWQ_ORDER)].reshape(rows, cols)
    return pack_int4(interleaved, dim=-1)


def awq_tensors(weight: Int4Weight) -> dict[str, torch.Tensor]:
    return {"qweight": pack_awq(weight.q), "qzeros": pack_awq(weight.zeros), "scales": weight.scales}


def gptq_tensors(weight: Int4Weight, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    zeros = weight.zeros - 1 if checkpoint_format == "gptq" else weight.zeros
    return {"qweight": pack_int4(weight.q, dim=0), "qzeros": pack_int4(zeros, dim=-1), "scales": weight.scales,
            "g_idx": weight.g_idx}


def is_quantized_linear(name: str, tensor: torch.Tensor) -> bool:
    """The decoder layers' projection weights: what AutoAWQ and AutoGPTQ quantize."""
    return ".layers." in name and name.endswith("_proj.weight") and tensor.ndim == 2


def write_quantized_checkpoint(src_dir: str, dst_dir: str, quantization_config: dict, *, seed: int = 0,
                               dequantized_dir: str | None = None) -> dict[str, torch.Tensor]:
    """Write `src_dir`'s float checkpoint in `quantization_config`'s format to `dst_dir`.

    Returns the dequantized float weights [out, in] by checkpoint name; with `dequantized_dir` also
    writes them as a plain float checkpoint (what transformers runs to check the engine against).
    Act-order permutations are drawn per input tensor, so fused q/k/v and gate/up share theirs.
    """
    method = quantization_config["quant_method"]
    group_size = quantization_config["group_size"]
    sym = quantization_config.get("sym", False)
    desc_act = quantization_config.get("desc_act", False)
    checkpoint_format = quantization_config.get("checkpoint_format", "gptq")
    generator = torch.Generator().manual_seed(seed)
    act_orders: dict[str, torch.Tensor] = {}
    packed, dequantized = {}, {}
    tensors = {name: t for path in _safetensors_files(src_dir) for name, t in load_file(path).items()}
    for name, tensor in tensors.items():
        if not is_quantized_linear(name, tensor):
            packed[name] = dequantized[name] = tensor
            continue
        act_order = None
        if desc_act:
            key = f"{name.rsplit('.', 2)[0]}.{_input_of(name)}"
            if key not in act_orders:
                act_orders[key] = torch.randperm(tensor.shape[1], generator=generator)
            act_order = act_orders[key]
        weight = quantize_int4(tensor, group_size, symmetric=sym, act_order=act_order,
                               min_zero=1 if method == "gptq" and checkpoint_format == "gptq" else 0)
        parts = awq_tensors(weight) if method == "awq" else gptq_tensors(weight, checkpoint_format)
        prefix = name.removesuffix(".weight")
        packed.update({f"{prefix}.{part}": value for part, value in parts.items()})
        dequantized[name] = weight.dequantize().to(tensor.dtype)
    _write_checkpoint(src_dir, dst_dir, packed, quantization_config)
    if dequantized_dir is not None:
        _write_checkpoint(src_dir, dequantized_dir, dequantized, None)
    return {name: dequantized[name] for name, t in tensors.items() if is_quantized_linear(name, t)}


def write_int8_dequantized_checkpoint(src_dir: str, dst_dir: str, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Write `src_dir` with every decoder linear weight replaced by its int8 round trip (scales in
    `scale_dtype`, the engine's dtype): the float checkpoint that int8 at load is equivalent to.
    Returns those weights by checkpoint name."""
    tensors = {name: t for path in _safetensors_files(src_dir) for name, t in load_file(path).items()}
    dequantized = {name: dequantize_int8(*quantize_int8(t, scale_dtype)).to(t.dtype)
                   for name, t in tensors.items() if is_quantized_linear(name, t)}
    _write_checkpoint(src_dir, dst_dir, {**tensors, **dequantized}, None)
    return dequantized


def _input_of(name: str) -> str:
    """Which input a projection reads: q/k/v read one, gate/up another."""
    projection = name.rsplit(".", 2)[-2]
    return {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(projection, projection)


def _safetensors_files(model_dir: str) -> list[str]:
    return sorted(os.path.join(model_dir, f) for f in os.listdir(model_dir) if f.endswith(".safetensors"))


def _write_checkpoint(src_dir: str, dst_dir: str, tensors: dict[str, torch.Tensor], quantization_config: dict | None) -> None:
    """Copy `src_dir`'s config, tokenizer and generation files; write `tensors` as one safetensors file."""
    os.makedirs(dst_dir, exist_ok=True)
    for f in os.listdir(src_dir):
        if not f.endswith(".safetensors") and f != "model.safetensors.index.json":
            shutil.copy(os.path.join(src_dir, f), dst_dir)
    save_file({name: t.contiguous() for name, t in tensors.items()}, os.path.join(dst_dir, "model.safetensors"),
              metadata={"format": "pt"})
    if quantization_config is not None:
        config_path = os.path.join(dst_dir, "config.json")
        with open(config_path) as f:
            config = json.load(f)
        config["quantization_config"] = quantization_config
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2)
