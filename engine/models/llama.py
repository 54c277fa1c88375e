"""Llama 2 / 3 / 3.1 and Mistral: pre-norm decoder layers of GQA attention with rotary embedding and a
SwiGLU MLP. Tokens of all sequences in a step are flattened into one [T] batch; the attention op
finds each token's sequence, cache slots and context through the forward context."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from engine.models.layers import (
    Attention,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    apply_rotary_emb,
)


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, layer_idx: int, tp_rank: int, tp_size: int, quant_config: Any, prefix: str,
                 qkv_bias: bool | None = None, o_bias: bool | None = None):
        super().__init__()
        bias = getattr(config, "attention_bias", False)
        head_dim = head_dim_of(config)
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, head_dim, config.num_attention_heads, config.num_key_value_heads,
            bias=bias if qkv_bias is None else qkv_bias,
            tp_rank=tp_rank, tp_size=tp_size, quant_config=quant_config, prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(  # its all-reduce: in the next norm (LlamaDecoderLayer)
            config.num_attention_heads * head_dim, config.hidden_size, bias=bias if o_bias is None else o_bias,
            tp_rank=tp_rank, tp_size=tp_size, quant_config=quant_config, prefix=f"{prefix}.o_proj",
            reduce_results=False,
        )
        num_heads, num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads  # this rank's
        self.split_sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        self.head_dim = head_dim
        self.attn = Attention(num_heads, num_kv_heads, head_dim, layer_idx, scale=head_dim**-0.5)

    def rotated_qkv(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, hidden] -> qk [T, heads + kv_heads, head_dim] rotated (the query heads, then the key heads, side
        by side as the qkv projection writes them: one pass, one kernel a layer once compiled), v [T, kv_heads,
        head_dim]."""
        qkv = self.qkv_proj(hidden)
        q_size, k_size, _ = self.split_sizes
        qk = apply_rotary_emb(qkv[..., : q_size + k_size].unflatten(-1, (-1, self.head_dim)), cos, sin)
        return qk, qkv[..., q_size + k_size :].unflatten(-1, (-1, self.head_dim))

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.attn(*self.rotated_qkv(hidden, cos, sin)))


class LlamaMLP(nn.Module):
    def __init__(self, config: Any, tp_rank: int, tp_size: int, quant_config: Any, prefix: str):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; supported: silu")
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias=bias,
            tp_rank=tp_rank, tp_size=tp_size, quant_config=quant_config, prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(  # its all-reduce: in the next norm
            config.intermediate_size, config.hidden_size, bias=bias,
            tp_rank=tp_rank, tp_size=tp_size, quant_config=quant_config, prefix=f"{prefix}.down_proj",
            reduce_results=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # silu(gate) * up, inside the down projection (one kernel with it at small batches on CUDA)
        return self.down_proj(self.gate_up_proj(x), silu_mul_input=True)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int, attention_cls: type[LlamaAttention], tp_rank: int,
                 tp_size: int, quant_config: Any, prefix: str):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention_cls(config, layer_idx, tp_rank, tp_size, quant_config, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, tp_rank, tp_size, quant_config, f"{prefix}.mlp")
        self.reduce = tp_size > 1

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h = h + attn(norm(h)); h = h + mlp(norm(h)), with the residual stream h carried apart:
        x is what the previous layer added (with tensor parallelism, each rank's unreduced share,
        summed by the norm; None for the first layer, whose x is the embedding). Returns this
        layer's (x, residual)."""
        x, residual = self.input_layernorm.add_and_norm(x, residual, reduce=self.reduce)
        x = self.self_attn(x, cos, sin)
        x, residual = self.post_attention_layernorm.add_and_norm(x, residual, reduce=self.reduce)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: Any, attention_cls: type[LlamaAttention], tp_rank: int, tp_size: int,
                 quant_config: Any):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp_rank, tp_size)
        self.rotary_emb = RotaryEmbedding.from_config(config, head_dim_of(config))
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, attention_cls, tp_rank, tp_size, quant_config, f"model.layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.reduce = tp_size > 1

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Each all-reduce (the embedding's, each row-parallel layer's) happens in the norm after it.
        x, residual = self.embed_tokens(input_ids, reduce=False), None
        cos, sin = self.rotary_emb(positions)
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin)
        return self.norm.add_and_norm(x, residual, reduce=self.reduce)[0]


class LlamaForCausalLM(nn.Module):
    attention_cls: type[LlamaAttention] = LlamaAttention

    # (our fused parameter, the checkpoint's part, shard id)
    stacked_params = [
        (".qkv_proj.", ".q_proj.", "q"),
        (".qkv_proj.", ".k_proj.", "k"),
        (".qkv_proj.", ".v_proj.", "v"),
        (".gate_up_proj.", ".gate_proj.", 0),
        (".gate_up_proj.", ".up_proj.", 1),
    ]

    def __init__(self, config: Any, tp_rank: int = 0, tp_size: int = 1, quant_config: Any = None):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.attention_cls, tp_rank, tp_size, quant_config)
        tied_to = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp_rank, tp_size, tied_to=tied_to)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden, upcast)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full HF-layout tensors by their checkpoint names; every parameter must be covered."""
        params = dict(self.named_parameters())  # a tied lm_head.weight is listed once, as the embedding
        # Parameters tagged `optional` (a quantization format's metadata some checkpoints omit) may be absent.
        expected = {ckpt_name for name, param in params.items() if not getattr(param, "optional", False)
                    for ckpt_name in self._checkpoint_names(name)}
        loaded = set()
        for ckpt_name, tensor in weights:
            if "rotary_emb.inv_freq" in ckpt_name:
                continue
            if ckpt_name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # some tied checkpoints still store the head; it equals the embedding
            name, shard_id = self._param_name(ckpt_name)
            if name not in params:
                raise ValueError(f"checkpoint tensor {ckpt_name!r} matches no parameter of {type(self).__name__}")
            param = params[name]
            try:
                param.weight_loader(param, tensor, shard_id)
            except ValueError as e:
                raise ValueError(f"checkpoint tensor {ckpt_name!r}: {e}") from None
            loaded.add(ckpt_name)
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing weights: {', '.join(missing)}")

    def _param_name(self, ckpt_name: str) -> tuple[str, Any]:
        for ours, ckpt_part, shard_id in self.stacked_params:
            if ckpt_part in ckpt_name:
                return ckpt_name.replace(ckpt_part, ours), shard_id
        return ckpt_name, None

    def _checkpoint_names(self, param_name: str) -> list[str]:
        """The checkpoint tensors that fill one parameter (several for a fused one)."""
        fused = [param_name.replace(ours, part) for ours, part, _ in self.stacked_params if ours in param_name]
        return fused or [param_name]


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral is Llama's architecture. A `sliding_window` in its config is the engine's business: it
    caps max_model_len so that no sequence ever reaches the window."""
