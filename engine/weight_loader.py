"""Reading safetensors checkpoints and building a model from one."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from engine.models.layers import LinearBase, UnquantizedLinearMethod
from engine.models.registry import get_model_class

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def checkpoint_files(model_dir: str) -> list[str]:
    """The safetensors files of a checkpoint: the shards its index names, or its single file."""
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                shards = list(dict.fromkeys(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{index_path} is not a safetensors index (a JSON object with a 'weight_map'): "
                             f"{type(exc).__name__}: {exc}") from None
        paths = [os.path.join(model_dir, shard) for shard in shards]
        for path in paths:
            if not os.path.exists(path):
                raise ValueError(f"{index_path} names shard {os.path.basename(path)!r}, which does not exist")
        return paths
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.exists(single):
        return [single]
    raise ValueError(f"no safetensors checkpoint in {model_dir} (expected {SINGLE_FILE} or {INDEX_FILE})")


def iterate_checkpoint(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one tensor at a time, so a model is never held twice in memory."""
    for path in checkpoint_files(model_dir):
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read safetensors file {path} (corrupt or truncated?): {e}") from None


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(
    model_dir: str,
    hf_config: Any,
    dtype: torch.dtype,
    device: str | torch.device,
    tp_rank: int = 0,
    tp_size: int = 1,
    quant_config: Any = None,
    load_format: str = "auto",
) -> nn.Module:
    """Build the model for `hf_config` in `dtype` on `device`, load this rank's weights, eval mode.

    Parameters are created with `torch.empty` directly on the device (no random init to pay for)
    and every one of them must be filled by the checkpoint, or this raises ValueError naming it.
    `load_format="dummy"` reads nothing and fills the weights with small random values instead
    (benchmarks of published configs: weights do not change the cost).
    """
    model_cls = get_model_class(hf_config.architectures)
    with default_dtype(dtype), torch.device(device):
        model = model_cls(hf_config, tp_rank=tp_rank, tp_size=tp_size, quant_config=quant_config)
    if load_format == "dummy":
        with torch.no_grad():
            for param in model.parameters():
                if param.is_floating_point():
                    param.uniform_(-1e-3, 1e-3)
                elif getattr(param, "packed_dim", None) is not None:
                    param.random_()  # packed int4 words: any bits are valid weights
                elif param.dtype == torch.int8:
                    param.random_(-128, 128)  # int8 weights: any value is valid; torch.empty's would change run to run
                # other integer tensors (GPTQ's g_idx) keep the valid values they were created with
            shuffle = torch.Generator().manual_seed(0)
            for module in model.modules():
                if getattr(module, "act_order", False):
                    # An act-order checkpoint's inputs come in no group order (GPTQ quantizes them by
                    # decreasing activation): give the dummy layer's g_idx a random one too, so a
                    # benchmark pays for what such a checkpoint costs (its inputs gathered each call).
                    g_idx = module.g_idx.data
                    g_idx.copy_(g_idx[torch.randperm(g_idx.numel(), generator=shuffle).to(g_idx.device)])
    elif load_format == "auto":
        model.load_weights(iterate_checkpoint(model_dir))
    else:
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    with torch.no_grad():  # a quantization method's repacking, once every weight is in
        from engine.quantization import swapab

        swapab.plan_copies(model)  # ENGINE_SWAPAB_GEMM=auto: whether 4-bit layers keep a swap-AB copy
        for module in model.modules():
            process = getattr(getattr(module, "quant_method", None), "process_weights_after_loading", None)
            if process is not None:
                process(module)
    return model.eval()


def weight_memory(model: nn.Module, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes the model's parameters and buffers take, bytes they would take with every quantized
    linear layer's weight stored unquantized in `dtype`)."""
    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    actual = nbytes(model.parameters()) + nbytes(model.buffers())
    dense = actual
    itemsize = torch.empty((), dtype=dtype).element_size()
    for module in model.modules():
        if isinstance(module, LinearBase) and not isinstance(module.quant_method, UnquantizedLinearMethod):
            own = [t for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)) if t is not module.bias]
            dense += module.dense_weight_numel * itemsize - nbytes(own)
    return actual, dense
