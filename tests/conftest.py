"""Shared fixtures: tiny random-weight checkpoints, built once per test session."""

from __future__ import annotations

import pytest

from engine.demo_model import build_tiny_checkpoint

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}

# name -> (architecture, config overrides). Between them they cover every option the models read.
TINY_CHECKPOINTS = {
    "llama": ("LlamaForCausalLM", {}),
    # Llama 3.1 style rope scaling, tied embeddings, head_dim (32) != hidden_size / heads (16), biases,
    # and a vocabulary larger than the tokenizer's (as real checkpoints pad it) that no tp size divides.
    "llama3-tied": (
        "LlamaForCausalLM",
        dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True, head_dim=32, attention_bias=True, mlp_bias=True,
             vocab_size=1001),
    ),
    "mistral": ("MistralForCausalLM", {}),
    "qwen2": ("Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3ForCausalLM", dict(head_dim=32)),
}


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, str]:
    """name -> directory of a built checkpoint; each is built the first time a test asks for it."""

    class LazyCheckpoints(dict):
        def __missing__(self, name: str) -> str:
            architecture, overrides = TINY_CHECKPOINTS[name]
            self[name] = build_tiny_checkpoint(str(tmp_path_factory.mktemp(name)), architecture, **overrides)
            return self[name]

    return LazyCheckpoints()


@pytest.fixture(scope="session")
def llama_checkpoint(tiny_checkpoints) -> str:
    return tiny_checkpoints["llama"]
