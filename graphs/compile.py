"""torch.compile of the model forward, with the attention op opaque inside it.

One compile with a dynamic token dimension serves every batch shape, one token included: the token
dimension of the inputs is marked "unbacked" on every call, so dynamo does not specialize the sizes 0
and 1 (a second compile, +70 s of start-up on the H100, when a one-token batch came), and the decode
graphs can have a bucket of 1 (one sequence used to pad to 2 rows, which cost the 4-bit kernels a
second row's work). Inductor's cache lives on disk under
~/.cache/engine/torchinductor unless TORCHINDUCTOR_CACHE_DIR says otherwise, so a second start
reuses the compiled kernels.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch
from torch._dynamo.decorators import mark_unbacked

logger = logging.getLogger("engine")

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "engine", "torchinductor"))


def compile_model(model: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The model's forward(input_ids, positions), compiled by inductor for any number of tokens."""
    compiled = torch.compile(model.forward, fullgraph=True, dynamic=True)

    def forward(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        mark_unbacked(input_ids, 0)
        mark_unbacked(positions, 0)
        return compiled(input_ids, positions)

    return forward


def num_compiled_graphs() -> int:
    """How many graphs dynamo has compiled in this process: a number that grows after warm-up is a
    recompile storm (and past torch's recompile limit, a silent fall back to eager)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
