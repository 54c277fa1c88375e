"""Which model class serves which HF `architectures` name."""

from __future__ import annotations

from torch import nn

from engine.models.llama import LlamaForCausalLM, MistralForCausalLM
from engine.models.qwen2 import Qwen2ForCausalLM
from engine.models.qwen3 import Qwen3ForCausalLM

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def get_model_class(architectures: list[str]) -> type[nn.Module]:
    """The class for the first supported name in a config's `architectures` list."""
    for name in architectures or []:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ValueError(
        f"Model architectures {list(architectures or [])} are not supported. Supported: {', '.join(ARCHITECTURES)}"
    )
