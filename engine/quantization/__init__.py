"""Quantized checkpoints: which method a checkpoint uses (its config.json's `quantization_config`,
auto-detected as vLLM does) and the linear methods that load and multiply its packed weights."""

from __future__ import annotations

from typing import Any

from engine.quantization.awq import AWQConfig, AWQLinearMethod
from engine.quantization.base import QuantizationConfig
from engine.quantization.gptq import GPTQConfig, GPTQLinearMethod

QUANTIZATION_METHODS: dict[str, type[QuantizationConfig]] = {"awq": AWQConfig, "gptq": GPTQConfig}

__all__ = ["AWQConfig", "AWQLinearMethod", "GPTQConfig", "GPTQLinearMethod", "QUANTIZATION_METHODS",
           "QuantizationConfig", "resolve_quant_config"]


def resolve_quant_config(hf_config: Any, requested: str | None) -> QuantizationConfig | None:
    """The checkpoint's quantization, checked against what the user asked for (None: auto-detect)."""
    checkpoint = getattr(hf_config, "quantization_config", None)
    if checkpoint is not None and not isinstance(checkpoint, dict):
        checkpoint = checkpoint.to_dict()
    if not checkpoint:
        if requested is not None:
            raise ValueError(f"quantization={requested!r} was asked for, but the checkpoint is not quantized "
                             f"(its config.json has no quantization_config)")
        return None
    method = str(checkpoint.get("quant_method", "")).lower()
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"the checkpoint is quantized with {method!r}, which is not supported; "
                         f"supported: {', '.join(QUANTIZATION_METHODS)}")
    if requested is not None and requested != method:
        raise ValueError(f"quantization={requested!r} contradicts the checkpoint, which is quantized with {method!r}")
    return QUANTIZATION_METHODS[method].from_config(checkpoint)
