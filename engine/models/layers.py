"""Layers the model files are built from: norms, rotary embedding, the paged attention call, and
linear layers laid out for tensor parallelism (Megatron style, as in vLLM).

Tensor parallelism: a column-parallel layer holds rows ``[rank*n/tp, (rank+1)*n/tp)`` of the output
dimension, a row-parallel layer the same slice of the input dimension and all-reduces its output, so
an MLP or attention block needs one all-reduce. With ``tp_size == 1`` every layer is a plain
``F.linear`` / ``F.embedding`` and no collective is called.

Checkpoints always hold FULL tensors in Hugging Face layout; every parameter carries a
``weight_loader(param, loaded_weight, shard_id=None)`` that cuts this rank's slice out of the full
tensor and copies it to its place (fused q/k/v and gate/up keep their parts side by side).

Quantization slots in through ``quant_config.get_linear_method(layer, prefix)``: the method creates
the layer's parameters (tagged with ``input_dim`` / ``output_dim`` so the loaders can shard them) and
computes the matmul. Without a quant config it is ``UnquantizedLinearMethod``.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.communication import add_rms_norm, all_reduce, all_reduce_add_rms_norm, rms_norm
import ops.attention  # noqa: F401  (registers torch.ops.engine.paged_attention)
from ops.linear import dense_linear, silu_and_mul, silu_mul_dense_linear


# ---------------------------------------------------------------------------------------------
# Norm, MLP activation, rotary embedding, attention


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight multiply, exactly as HF Llama."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.weight.weight_loader = default_weight_loader
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor | None,
                     reduce: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """h = x + residual (None: h = x), returned as (norm(h), h); with `reduce`, x is a row-parallel
        layer's partial sum, summed over the tensor-parallel ranks first. The pre-norm residual stream
        of a decoder layer, in the form that lets the all-reduce, the add and the norm run as one kernel
        (engine.communication.all_reduce_add_rms_norm)."""
        if reduce:
            return all_reduce_add_rms_norm(x, residual, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(config: Any) -> dict:
    """The rope settings of an HF config, whichever way its transformers version stores them.

    transformers 5.x keeps everything, ``rope_theta`` included, in ``config.rope_parameters``;
    4.x has ``config.rope_theta`` plus an optional ``config.rope_scaling`` dict.
    """
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def rope_inverse_frequencies(head_dim: int, params: dict) -> torch.Tensor:
    """Per-pair rotation frequencies [head_dim // 2], float32, as transformers computes them."""
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (params["rope_theta"] ** exponents)
    if rope_type == "linear":
        return inv_freq / params["factor"]
    if rope_type == "llama3":
        factor = params["factor"]
        low, high = params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Neox-style (rotate-half) rotary embedding with a precomputed float32 cos/sin table.

    The model calls it once per forward to look up the positions' cos/sin, which every layer reuses.
    """

    def __init__(self, head_dim: int, max_position: int, params: dict):
        super().__init__()
        inv_freq = rope_inverse_frequencies(head_dim, params)
        freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.register_buffer("cos", freqs.cos(), persistent=False)  # [max_position, head_dim // 2]
        self.register_buffer("sin", freqs.sin(), persistent=False)

    @classmethod
    def from_config(cls, config: Any, head_dim: int) -> "RotaryEmbedding":
        return cls(head_dim, config.max_position_embeddings, rope_parameters(config))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # [T, 1, head_dim]: one row per token, broadcast over heads; halves duplicated like HF's.
        cos = self.cos[positions].repeat(1, 2)[:, None, :]
        sin = self.sin[positions].repeat(1, 2)[:, None, :]
        return cos, sin


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [T, heads, head_dim] by the positions' angles; math in x's dtype, as HF does."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Causal attention over the paged KV cache; projects nothing, the caller owns q/k/v/o."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_idx = layer_idx
        self.scale = scale

    def forward(self, qk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """qk [T, num_heads + num_kv_heads, head_dim] (the query heads, then the key heads), v [T, num_kv_heads,
        head_dim] -> [T, num_heads * head_dim]."""
        out = qk.new_empty(qk.shape[0], self.num_heads, self.head_dim)
        torch.ops.engine.paged_attention(qk, v, out, self.layer_idx, self.scale)
        return out.flatten(1)


# ---------------------------------------------------------------------------------------------
# Weight loading helpers


def _check_shape(expected: tuple[int, ...] | torch.Size, loaded: torch.Tensor) -> None:
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(f"expected shape {tuple(expected)}, got {tuple(loaded.shape)}")


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
    """Copy a replicated (unsharded) tensor as is."""
    _check_shape(param.shape, loaded_weight)
    param.data.copy_(loaded_weight)


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by tensor_parallel_size ({denominator})")
    return numerator // denominator


# ---------------------------------------------------------------------------------------------
# Linear layers


class LinearMethod(Protocol):
    """How a linear layer stores its weights and multiplies by them (plain, or a quantized format)."""

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], weight_loader) -> None:
        """Register this rank's parameters on `layer` (input_size and output_sizes are per rank);
        tag each with `input_dim` / `output_dim` (or None) and `weight_loader`."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...


class UnquantizedLinearMethod:
    """A dense weight [out, in] in the model dtype; `F.linear` (on CUDA, one or two rows through the Triton
    GEMV: `ops.linear.dense_linear`)."""

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], weight_loader) -> None:
        weight = nn.Parameter(torch.empty(sum(output_sizes), input_size), requires_grad=False)
        weight.input_dim, weight.output_dim, weight.weight_loader = 1, 0, weight_loader
        layer.weight = weight

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return dense_linear(x, layer.weight, bias)


class LinearBase(nn.Module):
    """A linear layer whose weights its quant method owns, plus an optional bias."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool,
        bias_sharded: bool,
        tp_rank: int,
        tp_size: int,
        quant_config: Any,
        prefix: str,
    ):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank, tp_size
        method = quant_config.get_linear_method(self, prefix) if quant_config is not None else None
        self.quant_method: LinearMethod = method or UnquantizedLinearMethod()
        self.dense_weight_numel = input_size * sum(output_sizes)  # this rank's weight, unquantized
        self.quant_method.create_weights(self, input_size, output_sizes, self.weight_loader)
        if bias:
            self.bias = nn.Parameter(torch.empty(sum(output_sizes)), requires_grad=False)
            self.bias.input_dim, self.bias.output_dim = None, (0 if bias_sharded else None)
            self.bias.weight_loader = self.weight_loader
        else:
            self.bias = None

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        raise NotImplementedError


class ColumnParallelLinear(LinearBase):
    """y = x W^T with W's output rows split across ranks; each rank returns its slice of y."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
        quant_config: Any = None,
        prefix: str = "",
    ):
        self.output_size = output_size
        per_rank = self.shard_sizes_per_rank(tp_size)
        super().__init__(input_size, per_rank, bias, True, tp_rank, tp_size, quant_config, prefix)

    def shard_sizes_per_rank(self, tp_size: int) -> list[int]:
        return [_divide(self.output_size, tp_size, "output size")]

    def shard_layout(self, shard_id: Any) -> tuple[int, int, int, int]:
        """(offset in this rank's param, rows, first row in the checkpoint tensor, checkpoint rows)."""
        rows = self.output_size // self.tp_size
        return 0, rows, self.tp_rank * rows, self.output_size

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        dim = param.output_dim
        if dim is None:
            return default_weight_loader(param, loaded_weight)
        offset, rows, ckpt_start, ckpt_rows = self.shard_layout(shard_id)
        if getattr(param, "packed_dim", None) == dim:  # several outputs per stored element (int4 in int32)
            offset, rows, ckpt_start, ckpt_rows = (n // param.pack_factor for n in (offset, rows, ckpt_start, ckpt_rows))
        expected = list(param.shape)
        expected[dim] = ckpt_rows
        _check_shape(expected, loaded_weight)
        param.data.narrow(dim, offset, rows).copy_(loaded_weight.narrow(dim, ckpt_start, rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one matmul (gate_up).

    Shard i of the checkpoint is loaded with ``shard_id=i``; each rank keeps its slice of every part.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False, tp_rank: int = 0,
                 tp_size: int = 1, quant_config: Any = None, prefix: str = ""):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias, tp_rank, tp_size, quant_config, prefix)

    def shard_sizes_per_rank(self, tp_size: int) -> list[int]:
        return [_divide(size, tp_size, "output size") for size in self.output_sizes]

    def shard_layout(self, shard_id: int) -> tuple[int, int, int, int]:
        per_rank = [size // self.tp_size for size in self.output_sizes]
        rows = per_rank[shard_id]
        return sum(per_rank[:shard_id]), rows, self.tp_rank * rows, self.output_sizes[shard_id]


class QKVParallelLinear(ColumnParallelLinear):
    """The q, k and v projections fused; each rank holds num_heads / tp query heads and its KV heads.

    When there are fewer KV heads than ranks, each KV head is replicated on tp / num_kv_heads ranks.
    Checkpoint tensors are loaded with ``shard_id`` "q", "k" or "v".
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1, quant_config: Any = None, prefix: str = ""):
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = num_heads, num_kv_heads
        self.num_heads = _divide(num_heads, tp_size, "number of attention heads")
        if num_kv_heads >= tp_size:
            self.num_kv_heads, self.kv_replicas = _divide(num_kv_heads, tp_size, "number of KV heads"), 1
        else:
            self.num_kv_heads, self.kv_replicas = 1, _divide(tp_size, num_kv_heads, "tp size over KV heads")
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, output_size, bias, tp_rank, tp_size, quant_config, prefix)

    def shard_sizes_per_rank(self, tp_size: int) -> list[int]:
        return [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2

    def shard_layout(self, shard_id: str) -> tuple[int, int, int, int]:
        q_rows, kv_rows = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            return 0, q_rows, self.tp_rank * q_rows, self.total_num_heads * self.head_dim
        kv_start = (self.tp_rank // self.kv_replicas) * kv_rows
        offset = q_rows if shard_id == "k" else q_rows + kv_rows
        return offset, kv_rows, kv_start, self.total_num_kv_heads * self.head_dim


class RowParallelLinear(LinearBase):
    """y = x W^T with W's input columns split across ranks: each rank multiplies its slice of x
    (the output of a column-parallel layer) and the partial sums are all-reduced; or, with
    `reduce_results=False`, returned unreduced for the caller to all-reduce (a norm that fuses it)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp_rank: int = 0,
                 tp_size: int = 1, quant_config: Any = None, prefix: str = "", reduce_results: bool = True):
        self.input_size = input_size
        self.reduce_results = reduce_results
        per_rank = _divide(input_size, tp_size, "input size")
        # The bias is added once, after the reduction, so it stays whole on every rank.
        super().__init__(per_rank, [output_size], bias, False, tp_rank, tp_size, quant_config, prefix)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        dim = param.input_dim
        if dim is None:
            return default_weight_loader(param, loaded_weight)
        cols = param.shape[dim]
        expected = list(param.shape)
        expected[dim] = cols * self.tp_size  # the input size, or its packed / grouped length
        _check_shape(expected, loaded_weight)
        param.data.copy_(loaded_weight.narrow(dim, self.tp_rank * cols, cols))

    def forward(self, x: torch.Tensor, silu_mul_input: bool = False) -> torch.Tensor:
        """With `silu_mul_input`, x is a gate_up projection's [..., 2 * in] output and the layer's input
        is silu(gate) * up (for dense weights made inside the matmul's kernel where it can)."""
        apply = self.quant_method.apply
        if silu_mul_input:
            if isinstance(self.quant_method, UnquantizedLinearMethod):
                apply = self._apply_silu_mul
            else:
                x = silu_and_mul(x)
        if self.tp_size == 1:
            return apply(self, x, self.bias)
        if not self.reduce_results:  # the bias once in the sum: rank 0's share
            return apply(self, x, self.bias if self.tp_rank == 0 else None)
        y = all_reduce(apply(self, x, None))
        return y if self.bias is None else y + self.bias

    @staticmethod
    def _apply_silu_mul(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return silu_mul_dense_linear(x, layer.weight, bias)


# ---------------------------------------------------------------------------------------------
# Embedding and LM head


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split across ranks (the last shard zero-padded when the
    vocabulary does not divide); tokens outside a rank's range embed to zero there, then all-reduce."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_rank: int = 0, tp_size: int = 1,
                 weight: nn.Parameter | None = None):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.rows_per_rank = -(-num_embeddings // tp_size)
        self.vocab_start = tp_rank * self.rows_per_rank
        if weight is None:
            weight = nn.Parameter(torch.empty(self.rows_per_rank, embedding_dim), requires_grad=False)
            weight.weight_loader = self.weight_loader
        self.weight = weight

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        _check_shape((self.num_embeddings, param.shape[1]), loaded_weight)
        rows = max(0, min(self.rows_per_rank, self.num_embeddings - self.vocab_start))
        param.data[:rows].copy_(loaded_weight[self.vocab_start : self.vocab_start + rows])
        param.data[rows:].zero_()

    def forward(self, input_ids: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """The embeddings; with `reduce=False` and more than one rank, this rank's share of them
        (zero outside its range) for the caller to all-reduce."""
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows_per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[:, None], 0)
        return all_reduce(out) if reduce else out


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection to vocabulary logits, split by vocabulary rows like the embedding.

    With tied word embeddings pass ``tied_to=the embedding``: the head then shares its weight.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_rank: int = 0, tp_size: int = 1,
                 tied_to: VocabParallelEmbedding | None = None):
        weight = tied_to.weight if tied_to is not None else None
        super().__init__(num_embeddings, embedding_dim, tp_rank, tp_size, weight)

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """Vocabulary logits, in float32 (upcast=False: the model's dtype, for a consumer that reads
        them once and widens them itself, as the fused sampler does)."""
        logits = dense_linear(hidden, self.weight)
        if self.tp_size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
            dist.all_gather(parts, logits)
            logits = torch.cat(parts, dim=-1)
        logits = logits[..., : self.num_embeddings]
        return logits.float() if upcast else logits
