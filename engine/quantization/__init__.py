"""Weight quantization: which method a checkpoint uses (its config.json's `quantization_config`,
auto-detected as vLLM does) or that quantizes a float checkpoint at load (int8, bitsandbytes), and
the linear methods that load and multiply the quantized weights (through `ops.quant_matmul`: Triton
kernels on CUDA, the pure-torch reference on CPU)."""

from __future__ import annotations

import json
import os
from typing import Any

from engine.quantization.awq import AWQConfig, AWQLinearMethod
from engine.quantization.base import QuantizationConfig
from engine.quantization.bnb import BitsAndBytesConfig, BitsAndBytesLinearMethod
from engine.quantization.gptq import GPTQConfig, GPTQLinearMethod
from engine.quantization.int8 import Int8Config, Int8LinearMethod

# Formats a checkpoint's quantization_config names, and every method `quantization=` accepts.
CHECKPOINT_METHODS: dict[str, type[QuantizationConfig]] = {"awq": AWQConfig, "gptq": GPTQConfig,
                                                           "bitsandbytes": BitsAndBytesConfig}
# Methods that quantize a float checkpoint at load when asked for by name.
LOAD_TIME_METHODS: dict[str, type[QuantizationConfig]] = {"int8": Int8Config, "bitsandbytes": BitsAndBytesConfig}
QUANTIZATION_METHODS: dict[str, type[QuantizationConfig]] = {**CHECKPOINT_METHODS, **LOAD_TIME_METHODS}

__all__ = ["AWQConfig", "AWQLinearMethod", "BitsAndBytesConfig", "BitsAndBytesLinearMethod", "CHECKPOINT_METHODS",
           "GPTQConfig", "GPTQLinearMethod", "Int8Config", "Int8LinearMethod", "LOAD_TIME_METHODS",
           "QUANTIZATION_METHODS", "QuantizationConfig", "resolve_quant_config"]


# Where AutoAWQ / AutoGPTQ wrote their settings before transformers put them in config.json.
QUANT_CONFIG_FILES = {"awq": ("quant_config.json", "quantize_config.json"), "gptq": ("quantize_config.json",)}


def resolve_quant_config(hf_config: Any, requested: str | None, model_dir: str | None = None) -> QuantizationConfig | None:
    """The checkpoint's quantization, checked against what the user asked for (None: auto-detect).

    Like vLLM, auto-detection reads config.json's `quantization_config`; an explicit `requested`
    method also finds its settings in the older tools' own files in `model_dir`. "int8" quantizes a
    float checkpoint at load, so it refuses one that is already quantized; "bitsandbytes" quantizes a
    float checkpoint at load and also loads one transformers saved in 8-bit.
    """
    checkpoint = getattr(hf_config, "quantization_config", None)
    if checkpoint is not None and not isinstance(checkpoint, dict):
        checkpoint = checkpoint.to_dict()
    if requested in LOAD_TIME_METHODS and not checkpoint:
        return LOAD_TIME_METHODS[requested]()
    if requested == "int8":
        raise ValueError(f"quantization='int8' contradicts the checkpoint, which is already quantized with "
                         f"{checkpoint.get('quant_method')!r} (int8 quantizes a float checkpoint at load)")
    if not checkpoint and requested is not None and model_dir is not None:
        checkpoint = _read_quant_config_file(model_dir, requested)
    if not checkpoint:
        if requested is not None:
            files = ", ".join(QUANT_CONFIG_FILES.get(requested, ()))
            raise ValueError(f"quantization={requested!r} was asked for, but the checkpoint is not quantized "
                             f"(its config.json has no quantization_config, and there is no {files})")
        return None
    method = str(checkpoint.get("quant_method", "")).lower()
    if method not in CHECKPOINT_METHODS:
        raise ValueError(f"the checkpoint is quantized with {method!r}, which is not supported; "
                         f"supported: {', '.join(CHECKPOINT_METHODS)}")
    if requested is not None and requested != method:
        raise ValueError(f"quantization={requested!r} contradicts the checkpoint, which is quantized with {method!r}")
    return CHECKPOINT_METHODS[method].from_config(checkpoint)


def _read_quant_config_file(model_dir: str, method: str) -> dict | None:
    for name in QUANT_CONFIG_FILES.get(method, ()):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                return {"quant_method": method, **json.load(f)}
    return None
