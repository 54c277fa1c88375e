"""torch.compile of the model forward, with the attention op opaque inside it.

One compile with a dynamic token dimension serves every batch shape, one token included: the token
dimension of the inputs is marked "unbacked" on every call, so dynamo does not specialize the sizes 0
and 1 (a second compile, +70 s of start-up on the H100, when a one-token batch came), and the decode
graphs can have a bucket of 1 (one sequence used to pad to 2 rows, which cost the 4-bit kernels a
second row's work). Inductor's cache lives on disk under
~/.cache/engine/torchinductor unless TORCHINDUCTOR_CACHE_DIR says otherwise, so a second start
reuses the compiled kernels.

`ENGINE_TOKEN_DIM=backed` marks the token dimension dynamic (backed) instead, for A/B runs: GPU profiles
show inductor making two kernels of every RMSNorm (a reduction, then a pointwise pass), which a backed size
may let it fuse (perf/fusion_probe.py; perf/RESULTS.md, session 20). The price: a second graph for one
token. (torch's `backed_size_oblivious` does not avoid it: inductor's lowering of a view still guards
on the size being above 1, torch 2.13 on the CPU.)
"""

from __future__ import annotations

import json
import logging
import os
from typing import Callable

import torch
from torch._dynamo.decorators import mark_dynamic, mark_unbacked

logger = logging.getLogger("engine")

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "engine", "torchinductor"))


def inductor_options() -> dict | None:
    """ENGINE_INDUCTOR_OPTIONS, a JSON object of inductor options for torch.compile (for A/B runs of
    inductor's own switches, e.g. '{"combo_kernels": true}'; torch names the valid ones when given
    another); unset: inductor's defaults. They are part of the compile cache's key."""
    raw = os.environ.get("ENGINE_INDUCTOR_OPTIONS", "").strip()
    if not raw:
        return None
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"ENGINE_INDUCTOR_OPTIONS is not JSON ({exc}): {raw!r}") from None
    if not isinstance(options, dict):
        raise ValueError(f"ENGINE_INDUCTOR_OPTIONS must be a JSON object of option: value, not {raw!r}")
    return options


TOKEN_DIM_MARKS = ("unbacked", "backed")


def token_dim_mark() -> str:
    """ENGINE_TOKEN_DIM: how the token dimension is marked dynamic (see the module doc); default unbacked."""
    mark = os.environ.get("ENGINE_TOKEN_DIM", "").strip() or "unbacked"
    if mark not in TOKEN_DIM_MARKS:
        raise ValueError(f"ENGINE_TOKEN_DIM={mark!r}; choose one of {', '.join(TOKEN_DIM_MARKS)}")
    return mark


def compile_model(model: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The model's forward(input_ids, positions), compiled by inductor for any number of tokens."""
    options = inductor_options()
    if options:
        logger.info("torch.compile with inductor options %s (ENGINE_INDUCTOR_OPTIONS)", options)
    compiled = torch.compile(model.forward, fullgraph=True, dynamic=True, options=options)
    if token_dim_mark() == "backed":
        logger.info("torch.compile: the token dimension backed (ENGINE_TOKEN_DIM=backed; one token compiles a graph "
                    "of its own)")

        def forward(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            mark_dynamic(input_ids, 0)
            mark_dynamic(positions, 0)
            return compiled(input_ids, positions)

        return forward

    def forward(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        mark_unbacked(input_ids, 0)
        mark_unbacked(positions, 0)
        return compiled(input_ids, positions)

    return forward


def num_compiled_graphs() -> int:
    """How many graphs dynamo has compiled in this process: a number that grows after warm-up is a
    recompile storm (and past torch's recompile limit, a silent fall back to eager)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
