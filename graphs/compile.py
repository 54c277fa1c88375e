"""torch.compile of the model forward, with the attention op opaque inside it.

One compile with a dynamic token dimension serves every batch shape (dynamo still specializes a
batch of exactly one token, so expect two graphs). Inductor's cache lives on disk under
~/.cache/engine/torchinductor unless TORCHINDUCTOR_CACHE_DIR says otherwise, so a second start
reuses the compiled kernels.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

logger = logging.getLogger("engine")

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "engine", "torchinductor"))


def compile_model(model: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The model's forward(input_ids, positions), compiled by inductor."""
    return torch.compile(model.forward, fullgraph=True, dynamic=True)


def num_compiled_graphs() -> int:
    """How many graphs dynamo has compiled in this process: a number that grows after warm-up is a
    recompile storm (and past torch's recompile limit, a silent fall back to eager)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
