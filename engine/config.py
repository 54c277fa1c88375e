"""Engine configuration. `EngineArgs` is the one place where defaults live; the CLI and `LLM(...)`
take the same names (vLLM's)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, fields

import torch
from transformers import AutoConfig, PretrainedConfig

from engine.quantization import QUANTIZATION_METHODS, QuantizationConfig, resolve_quant_config

logger = logging.getLogger("engine")

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
ATTENTION_BACKENDS = ("auto", "triton", "xformers", "torch")
# KV-cache element types. "fp8" is e4m3 (vLLM's name for it on CUDA) with a scale of 1.0: keys and values
# are stored as they are, saturated to +-448, half the bytes of bf16 (twice the tokens in the same memory).
# "fp8_e5m2": 2 mantissa bits instead of 3, range +-57,344.
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
                   "fp8_e5m2": torch.float8_e5m2}


DEVICES = ("auto", "cuda", "cpu")

# Token buckets of the prefill / mixed-step CUDA graphs (EngineArgs.mixed_cuda_graph_sizes). Up to 8,192 (the default
# max_num_batched_tokens) since session 25: nano's 18 prefill steps of 8,192 tokens, run kernel by kernel, left the
# H100 idle ~43 ms of each ~67 ms step (profiled); replaying graphs they took 23.7 ms with 0.5 idle, and nano ran
# 18,843 / 18,905 output tok/s against 17,563 (perf/RESULTS.md, session 25).
DEFAULT_MIXED_CUDA_GRAPH_SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass
class EngineArgs:
    """Everything a user can set when starting the engine."""

    model: str = ""  # local Hugging Face checkpoint directory (or hub id when online)
    tokenizer: str | None = None  # tokenizer directory; defaults to the model's
    trust_remote_code: bool = False  # let transformers run code the checkpoint ships (its auto_map config or tokenizer classes)
    dtype: str = "auto"  # "auto" (the checkpoint's), "float32", "float16" or "bfloat16"
    max_model_len: int | None = None  # longest prompt + output; defaults to the model's max_position_embeddings
    gpu_memory_utilization: float = 0.9  # fraction of GPU memory the engine may use (weights, activations, KV cache)
    max_num_seqs: int = 256  # most sequences in one batch
    max_num_batched_tokens: int | None = None  # most tokens in one step (decodes + prompt chunks); default 8192
    block_size: int = 16  # tokens per KV-cache block
    kv_cache_dtype: str = "auto"  # "auto" (the model's dtype), "fp8" / "fp8_e4m3" or "fp8_e5m2" (half the bytes of bf16; attention backends triton and torch)
    seed: int = 0  # seed of the engine's random generator (unseeded requests draw from it)
    enforce_eager: bool = False  # no torch.compile, no CUDA graphs
    async_scheduling: bool = True  # build and launch step N+1 while the device runs step N
    compile_model: bool = True  # torch.compile the forward (CUDA graphs need not: they capture the eager model when off)
    tensor_parallel_size: int = 1  # devices (one process each) to split each layer across; on CPU, processes
    disable_custom_all_reduce: bool = False  # tensor parallelism on CUDA: NCCL for every all-reduce, not the symmetric-memory one-shot kernel for tensors up to 2 MiB
    quantization: str | None = None  # "awq"/"gptq" (must match the checkpoint), "int8" (quantized at load), "bitsandbytes" (LLM.int8(): at load, or a saved 8-bit checkpoint); None: the checkpoint's
    enable_prefix_caching: bool = False  # reuse KV blocks of earlier prompts with the same prefix
    num_gpu_blocks_override: int | None = None  # exact number of KV blocks, bypassing the memory budget
    kv_cache_memory: int | None = None  # bytes for the KV cache per rank on CPU (default 4 GiB), or on GPU instead of gpu_memory_utilization
    attention_backend: str = "auto"  # "auto" (triton on CUDA, torch on CPU), "triton", "xformers" or "torch"
    device: str = "auto"  # "auto" (cuda if available), "cuda" or "cpu"
    max_logprobs: int = 20  # most logprobs / prompt_logprobs a request may ask for
    cuda_graph_sizes: list[int] | None = None  # decode batch sizes to capture; default 1, 2, 4, 8, 16, ... 512
    mixed_cuda_graph_sizes: list[int] | None = None  # token counts of prefill / mixed steps to capture CUDA graphs for (a short prefill replays one graph instead of launching kernel by kernel); default 16, 32, ..., 8192 up to max_num_batched_tokens with one GPU, none with tensor parallelism (not yet measured there); 0: none
    max_waiting_requests: int | None = None  # reject new requests while this many wait (None = no limit)
    engine_process: bool | None = None  # server: the engine in its own process, so HTTP and the engine's host work do not share a GIL; None: on with a GPU, off on CPU
    stream_interval: int = 1  # server streams: send a request's first token at once, then every this many tokens (fewer chunks under load)
    load_format: str = "auto"  # "auto": the checkpoint's safetensors; "dummy": random weights (benchmarks)

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be at least 1, got {self.stream_interval}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {tuple(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.kv_cache_dtype != "auto" and self.attention_backend == "xformers":
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} needs attention_backend 'triton' or 'torch' "
                             "(xformers' kernels read 16-bit caches only)")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization={self.quantization!r} is not supported; supported: "
                             f"{', '.join(QUANTIZATION_METHODS)} (or None: detected from the checkpoint)")
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = 8192
        for name in ("max_num_batched_tokens", "num_gpu_blocks_override", "max_model_len", "kv_cache_memory",
                     "max_waiting_requests"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        mixed = self.mixed_cuda_graph_sizes
        if mixed is not None and mixed != [0] and any(t < 2 for t in mixed):
            raise ValueError(f"mixed_cuda_graph_sizes are token counts of steps with a prompt: at least 2 each "
                             f"(or 0 alone: none), got {mixed}")
        if self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be non-negative, got {self.max_logprobs}")
        if not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"seed must be a 64-bit integer, got {self.seed}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES} (tensor parallel ranks take cuda:0..N-1), got {self.device!r}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolve_engine_process(self) -> bool:
        """The server's engine in a child process: measured on the H100 it keeps up with the offline
        engine at 256 streams (in-process: two thirds of it); on a small CPU box the extra busy process
        costs more than it frees, so off there."""
        if self.engine_process is not None:
            return self.engine_process
        return self.resolve_device().type == "cuda"

    def resolve_mixed_cuda_graph_sizes(self) -> list[int]:
        """Token buckets of the prefill / mixed-step graphs. On by default since they were measured on
        an H100 (Llama-3.1-8B, one client: median TTFT 17.9 -> 12.4 ms; throughput unchanged)."""
        if self.mixed_cuda_graph_sizes is None:
            if self.tensor_parallel_size > 1:
                return []
            return [t for t in DEFAULT_MIXED_CUDA_GRAPH_SIZES if t <= self.max_num_batched_tokens]
        return [t for t in self.mixed_cuda_graph_sizes if t]

    def resolve_kv_cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return KV_CACHE_DTYPES[self.kv_cache_dtype] or model_dtype

    def resolve_attention_backend(self, device: torch.device) -> str:
        if self.attention_backend != "auto":
            return self.attention_backend
        return "triton" if device.type == "cuda" else "torch"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_tokenizer_files(path: str) -> None:
    """A local directory without any tokenizer file: say so (transformers suggests installing sentencepiece)."""
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise ValueError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {path}; pass the tokenizer's "
                         "directory with tokenizer=... / --tokenizer")


def check_local_path(path: str, what: str) -> None:
    """A path that is clearly meant to be local (it exists, or starts with / . or ~) must be a checkpoint
    directory; otherwise transformers takes it for a hub id and answers with a confusing message."""
    if os.path.isdir(path):
        config = os.path.join(path, "config.json")
        if what == "model" and not os.path.exists(config):
            raise ValueError(f"{what} directory {path} has no config.json: is it a Hugging Face checkpoint?")
        if what == "model":
            try:
                with open(config) as f:
                    json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{config} is not valid JSON: {exc}") from None
        return
    if os.path.exists(path):
        raise ValueError(f"{what} {path} is a file; give the checkpoint's directory")
    if path.startswith(("/", ".", "~")):
        raise ValueError(f"{what} directory {path} does not exist")


@dataclass
class ModelConfig:
    """What the engine learned from the checkpoint."""

    model: str
    hf_config: PretrainedConfig
    dtype: torch.dtype
    max_model_len: int
    eos_token_ids: set[int] = field(default_factory=set)
    generation_defaults: dict = field(default_factory=dict)
    quant_config: QuantizationConfig | None = None  # the weights' quantization (the checkpoint's, or int8 at load), if any

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size

    @classmethod
    def from_args(cls, args: EngineArgs, device: torch.device) -> "ModelConfig":
        if not args.model:
            raise ValueError("no model given: pass a checkpoint directory (model=... / --model)")
        check_local_path(args.model, "model")
        if args.tokenizer:
            check_local_path(args.tokenizer, "tokenizer")
        hf_config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        check_tensor_parallel_sizes(hf_config, args.tensor_parallel_size)
        dtype = _resolve_dtype(args.dtype, hf_config, device)
        quant_config = resolve_quant_config(hf_config, args.quantization, args.model)
        if quant_config is not None:
            logger.info("weight quantization: %s", quant_config)
        max_model_len = _resolve_max_model_len(args.max_model_len, hf_config)
        generation = _read_generation_config(args.model)
        eos = generation.get("eos_token_id", hf_config.eos_token_id)
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return cls(args.model, hf_config, dtype, max_model_len, eos_ids, generation, quant_config)


def check_tensor_parallel_sizes(hf_config: PretrainedConfig, tp_size: int) -> None:
    """Fail before any worker starts when the model cannot be split `tp_size` ways: query heads and
    the MLP's intermediate size must divide; KV heads must divide, or (fewer KV heads than ranks)
    divide tp_size so that each is replicated on the same number of ranks. The vocabulary needs no
    check: its last shard is zero-padded."""
    if tp_size == 1:
        return
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    if heads % tp_size:
        raise ValueError(f"the model's {heads} attention heads cannot be split over tensor_parallel_size={tp_size} ranks "
                         f"({heads} is not divisible by {tp_size})")
    if kv_heads >= tp_size and kv_heads % tp_size:
        raise ValueError(f"the model's {kv_heads} KV heads cannot be split over tensor_parallel_size={tp_size} ranks "
                         f"({kv_heads} is not divisible by {tp_size})")
    if kv_heads < tp_size and tp_size % kv_heads:
        raise ValueError(f"the model's {kv_heads} KV heads cannot be replicated over tensor_parallel_size={tp_size} ranks "
                         f"({tp_size} is not a multiple of {kv_heads})")
    intermediate = hf_config.intermediate_size
    if intermediate % tp_size:
        raise ValueError(f"the model's intermediate_size {intermediate} cannot be split over tensor_parallel_size={tp_size} "
                         f"ranks ({intermediate} is not divisible by {tp_size})")


def _resolve_dtype(name: str, hf_config: PretrainedConfig, device: torch.device) -> torch.dtype:
    if name == "auto":
        dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = _DTYPES[dtype]
        if device.type == "cpu" and dtype == torch.float16:
            logger.info("float16 is slow on CPU; using bfloat16")
            return torch.bfloat16
        return dtype
    if name not in _DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(set(_DTYPES))}, got {name!r}")
    return _DTYPES[name]


def _resolve_max_model_len(requested: int | None, hf_config: PretrainedConfig) -> int:
    limit = getattr(hf_config, "max_position_embeddings", None) or 2048
    window = getattr(hf_config, "sliding_window", None)
    if window and getattr(hf_config, "use_sliding_window", True) is not False and window < limit:
        # Sliding-window attention is not implemented: cap the context at the window, where
        # full attention and sliding-window attention agree.
        logger.info("model uses a sliding window of %d tokens: max_model_len capped there", window)
        limit = window
    if requested is None:
        return limit
    if requested > limit:
        raise ValueError(f"max_model_len ({requested}) is larger than the model's limit ({limit})")
    if requested < 1:
        raise ValueError(f"max_model_len must be at least 1, got {requested}")
    return requested


def _read_generation_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)
