"""Offline throughput benchmark: one `LLM.generate` call over a fixed workload, timed.

Workloads:
  nano    nano-vllm's bench.py exactly: random.seed(0); 256 prompts of random.randint(100, 1024)
          random token ids in [0, 10000], then 256 max_tokens = random.randint(100, 1024);
          temperature 0.6, ignore_eos, max_model_len 4096 (142,827 prompt / 133,966 output tokens).
  fixed   --num-requests prompts of --input-len random token ids, --output-len tokens each, ignore_eos.
  prefix  --num-requests prompts sharing one --prefix-len system prompt, each with its own
          --suffix-len tokens, --output-len tokens each, greedy; run with prefix caching off, then
          on, in the same process: prints both, the speed-up, the hit rate, and whether outputs match.
          The warm-up request primes the cache with the system prompt: the timed run is the steady
          state of a server whose system prompt was seen before.

Models: `qwen3-0.6b`, `llama-3.1-8b`, `llama-3.1-70b` (random-weight instances of the published
configs in perf/configs, bf16, weights made on the device: weights do not change the cost) or a
local checkpoint directory. `--compare-hf` runs the same workload through transformers' continuous
batching in the same process and prints the ratio.

`--quantization awq|gptq` makes the random-weight model a 4-bit checkpoint of that format (4 bits,
group size 128: AutoAWQ GEMM with zero points, GPTQ symmetric without act-order, or with it under
`--act-order`), its packed weights
made directly on the device; `int8|bitsandbytes` quantize at load, and random weights are made int8
directly. A checkpoint directory is loaded as it is, the flag checked against it.

    python perf/throughput.py --model qwen3-0.6b --workload nano
    python perf/throughput.py --model llama-3.1-8b --workload fixed --num-requests 1 --input-len 128 --output-len 512
    python perf/throughput.py --model llama-3.1-70b --quantization awq --workload fixed --input-len 128 --output-len 512
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import logging
import os
import pstats
import random
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import LLM, SamplingParams, communication, tensor_parallel  # noqa: E402
from engine.quantization import QUANTIZATION_METHODS  # noqa: E402
from engine.llm_engine import freeze_gc_heap  # noqa: E402
from engine.weight_loader import weight_memory  # noqa: E402
from perf.step_profile import StepWindow, print_summary  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
# The quantization_config a published 4-bit checkpoint of each format carries in its config.json
# (where the engine detects it); int8 and bitsandbytes quantize a float checkpoint at load instead.
CHECKPOINT_QUANT_CONFIGS = {
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
}


def nano_workload() -> tuple[list[list[int]], list[int]]:
    random.seed(0)
    num_seqs, max_input_len, max_output_len = 256, 1024, 1024
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, max_input_len))] for _ in range(num_seqs)]
    max_tokens = [random.randint(100, max_output_len) for _ in range(num_seqs)]
    return prompts, max_tokens


def fixed_workload(num: int, input_len: int, output_len: int, vocab: int = 10000) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(vocab) for _ in range(input_len)] for _ in range(num)], [output_len] * num


def prefix_workload(num: int, prefix_len: int, suffix_len: int, output_len: int, vocab: int = 10000):
    rng = random.Random(0)
    system = [rng.randrange(vocab) for _ in range(prefix_len)]
    return [system + [rng.randrange(vocab) for _ in range(suffix_len)] for _ in range(num)], [output_len] * num


def synthetic_model_dir(name: str, num_layers: int | None = None, quantization: str | None = None,
                        act_order: bool = False) -> str:
    """A checkpoint directory with a published config and a word-level tokenizer covering its whole
    vocabulary (so every id decodes, at the cost of a real Rust tokenizer); no weights.
    `num_layers` keeps only that many layers (a 70B-shaped model that fits fewer GPUs);
    `quantization` "awq" or "gptq" declares a 4-bit checkpoint of that format (others need nothing);
    `act_order` makes the GPTQ one act-order (desc_act: the dummy loader shuffles its groups)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    with open(os.path.join(CONFIGS, f"{name}.json")) as f:
        config = json.load(f)
    if num_layers is not None:
        config["num_hidden_layers"] = num_layers
    if quantization in CHECKPOINT_QUANT_CONFIGS:
        config["quantization_config"] = dict(CHECKPOINT_QUANT_CONFIGS[quantization])
    if act_order:
        if quantization != "gptq":
            raise ValueError("--act-order is for --quantization gptq")
        config["quantization_config"]["desc_act"] = True
    path = tempfile.mkdtemp(prefix=f"bench-{name}-")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    vocab = {f"t{i}": i for i in range(config["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eos = config["eos_token_id"]
    eos = eos[0] if isinstance(eos, list) else eos
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{eos}").save_pretrained(path)
    return path


def run_engine(args, model_dir: str, load_format: str, prompts, max_tokens) -> dict:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # a previous engine of this process has been dropped
    start = time.perf_counter()
    trigger, run_worker = None, tensor_parallel.run_worker
    if args.profile_steps and args.tensor_parallel_size > 1:
        # The workers profile the same window as rank 0 (see _profiling_worker), once the file exists.
        trigger = os.path.join(tempfile.mkdtemp(prefix="engine-profile-"), "go")
        os.environ["ENGINE_PROFILE_WORKER"] = "{},{},{}".format(trigger, *args.profile_steps)
        tensor_parallel.run_worker = _profiling_worker
    try:
        llm = LLM(
            model_dir,
            dtype="bfloat16",
            load_format=load_format,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            enforce_eager=args.enforce_eager,
            compile_model=not args.no_compile,
            async_scheduling=args.async_scheduling,
            attention_backend=args.attention_backend,
            kv_cache_dtype=args.kv_cache_dtype,
            mixed_cuda_graph_sizes=args.mixed_cuda_graph_sizes,
            enable_prefix_caching=args.enable_prefix_caching,
            gpu_memory_utilization=args.gpu_memory_utilization,
            tensor_parallel_size=args.tensor_parallel_size,
            disable_custom_all_reduce=args.disable_custom_all_reduce,
            quantization=args.quantization,
        )
    finally:  # the workers have started (and read the setting) by now
        tensor_parallel.run_worker = run_worker
        os.environ.pop("ENGINE_PROFILE_WORKER", None)
    startup = time.perf_counter() - start
    freeze_gc_heap()  # as the server and its engine process do after start-up (unfrozen when this run ends)
    params = [SamplingParams(temperature=args.temperature, ignore_eos=True, max_tokens=m) for m in max_tokens]
    inputs = [{"prompt_token_ids": p} for p in prompts]
    # Warm-up outside the timer: a short generate exercising prefill and decode.
    llm.generate(inputs[:2], SamplingParams(temperature=args.temperature, ignore_eos=True, max_tokens=8), use_tqdm=False)
    runner = llm.llm_engine.runner
    quant_config = llm.llm_engine.model_config.quant_config
    weight_bytes, _ = weight_memory(runner.model, llm.llm_engine.model_config.dtype)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timings_before = llm.llm_engine.timings.as_dict()
    before = llm.llm_engine.get_stats()
    llm_stats_before = (before.prefix_cache_hits_total, before.prefix_cache_queries_total)
    triton_before = triton_kernel_variants()
    gc_watch = GcWatch()
    llm.llm_engine.timings.per_step = []
    host_profile = cProfile.Profile() if args.host_profile else contextlib.nullcontext()
    step_marks = StepMarks(llm.llm_engine)
    with gc_watch, host_profile, step_marks:
        # The timer holds the generate call alone, not the watchers' set-up (GcWatch lists every tracked object):
        # before session 29 it held both, and 0.07-0.16 s of each GPU run lay before the first step.
        start = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=not args.no_tqdm)
        elapsed = time.perf_counter() - start
    if args.host_profile:
        # The timed run's Python on the host under cProfile (which slows it: the run's figures are not comparable).
        host_profile.dump_stats(args.host_profile)
        pstats.Stats(host_profile).sort_stats("tottime").print_stats(40)
    per_step, llm.llm_engine.timings.per_step = llm.llm_engine.timings.per_step, None
    triton_compiled = {name: n - triton_before.get(name, 0) for name, n in triton_kernel_variants().items()
                       if n > triton_before.get(name, 0)}
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    in_tokens = sum(len(p) for p in prompts)
    decode_rates = []
    for o in outputs:
        m, n = o.metrics, len(o.outputs[0].token_ids)
        if n > 1 and m.last_token_time > m.first_token_time:
            decode_rates.append((n - 1) / (m.last_token_time - m.first_token_time))
    decode_rates.sort()
    stats = llm.llm_engine.get_stats()
    hits_before, queries_before = llm_stats_before
    result = {
        **throughput_figures("engine", elapsed, len(prompts), in_tokens, out_tokens),
        "tensor_parallel_size": args.tensor_parallel_size,
        "custom_all_reduce": communication.custom_all_reduce_on() if args.tensor_parallel_size > 1 else None,
        "quantization": quant_config.name if quant_config is not None else None,  # what the engine loaded
        "weights_gib": weight_bytes / 2**30,  # one rank's
        "kv_cache_gib": runner.num_blocks * runner.kv_bytes_per_block / 2**30,  # one rank's
        "median_decode_tok_s_per_request": decode_rates[len(decode_rates) // 2] if decode_rates else None,
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "kv_blocks": runner.num_blocks,
        "startup_s": startup,
        "cuda_graphs": len(runner.graph_runner.graphs) if runner.graph_runner else 0,
        "mixed_cuda_graphs": sorted(runner.graph_runner.mixed_graphs) if runner.graph_runner else [],
        "recompiles_after_warmup": runner.recompiles_since_warmup(),
        # Triton kernels (ops/) compiled for a new specialization while the timer ran (rank 0), by name:
        # each is a JIT compile (~1 s with an empty Triton cache) inside the timed run.
        "triton_compiles_in_timed_run": triton_compiled,
        # Python's garbage collector during the timed run (rank 0's process): objects it tracked at
        # the start, then its collections and their summed pauses, by generation.
        "gc": gc_watch.summary(),
        "preemptions": stats.num_preemptions_total,
        "prefix_caching": args.enable_prefix_caching,
        "prefix_cache_hit_rate": (stats.prefix_cache_hits_total - hits_before) / max(stats.prefix_cache_queries_total - queries_before, 1),
        "kv_waste_fraction_mean": stats.kv_waste_fraction_mean,
        "output_token_ids": [o.outputs[0].token_ids for o in outputs] if args.workload == "prefix" else None,
        "attention_backend": runner.attention_backend,
        "kv_cache_dtype": str(runner.kv_cache_dtype).removeprefix("torch."),
        "compiled": runner.forward is not runner.model,
        "step_timings": {k: v - timings_before[k] for k, v in llm.llm_engine.timings.as_dict().items()},
        "step_phases": step_phases(per_step),
        # The timed run's wall time that no engine.step call covers: before the first (add_request), between steps
        # (LLM.generate's loop) and after the last.
        "outside_steps": step_marks.outside(start, start + elapsed),
    }
    if args.greedy_check:
        # A fixed prompt set, greedy, after the timed run: its tokens land in the JSON, so two runs
        # (two starts, other batch shapes) can be compared token for token.
        rng = random.Random(1234)
        vocab = min(10000, llm.llm_engine.model_config.hf_config.vocab_size)
        check = [{"prompt_token_ids": [rng.randint(0, vocab - 1) for _ in range(rng.randint(16, 128))]}
                 for _ in range(args.greedy_check)]
        greedy = llm.generate(check, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=32), use_tqdm=False)
        result["greedy_token_ids"] = [o.outputs[0].token_ids for o in greedy]
    if args.profile_steps:
        # The same workload once more, profiled over a window of steps (the timed run above was not).
        first, count = args.profile_steps
        window = StepWindow(llm.llm_engine, first, count, args.trace_out)
        if trigger is not None:
            open(trigger, "w").close()
        try:
            with window:
                llm.generate(inputs, params, use_tqdm=False)
        finally:
            if trigger is not None:
                shutil.rmtree(os.path.dirname(trigger), ignore_errors=True)
        result["profile"] = window.summary()
    llm.llm_engine.shutdown()  # tensor-parallel workers: the next engine of this process needs the group
    gc.unfreeze()  # so that the next engine of this process can have this one's memory
    return result


def _profiling_worker(*args) -> None:
    """`tensor_parallel.run_worker` for --profile-steps with tensor parallelism: the worker profiles
    its calls [FIRST, FIRST + COUNT) counted from when rank 0 creates the trigger file (its profiled
    run starts then), and prints the same summary as rank 0's (GPU busy a step, top ops): whether
    the workers' GPUs idle too, and on what. ENGINE_PROFILE_WORKER = "trigger,first,count"."""
    import functools
    import types

    from engine.model_runner import ModelRunner

    trigger, first, count = os.environ["ENGINE_PROFILE_WORKER"].split(",")
    first, count = int(first), int(count)
    original = ModelRunner.execute_model
    state: dict = {"window": None}

    def execute_model(self, *inputs):
        window = state["window"]
        if window == "done" or (window is None and not os.path.exists(trigger)):
            return original(self, *inputs)
        if window is None:
            window = state["window"] = StepWindow(types.SimpleNamespace(step=functools.partial(original, self)), first, count)
            window.__enter__()
        out = window.engine.step(*inputs)
        if window.calls == first + count - 1:
            window.__exit__(None, None, None)
            state["window"] = "done"
            print(f"tensor-parallel worker (pid {os.getpid()}), its window (counted in its steps, which skip rank 0's "
                  "steps that launch nothing):", flush=True)
            print_summary(window.summary())
            sys.stdout.flush()
        return out

    ModelRunner.execute_model = execute_model
    tensor_parallel.run_worker(*args)


class StepMarks:
    """When each engine.step call of the `with` body began and ended (the engine's step wrapped for the while)."""

    def __init__(self, engine):
        self.engine = engine
        self.marks: list[tuple[float, float]] = []

    def __enter__(self):
        step = self.engine.step

        def marked_step():
            began = time.perf_counter()
            try:
                return step()
            finally:
                self.marks.append((began, time.perf_counter()))

        self.engine.step = marked_step
        return self

    def __exit__(self, *exc):
        del self.engine.step  # the class's method again

    def outside(self, start: float, end: float) -> dict:
        """Seconds of [start, end) outside every step call: before the first, between calls, after the last."""
        if not self.marks:
            return {"before_first_s": end - start, "between_s": 0.0, "after_last_s": 0.0}
        between = sum(b - a for (_, a), (b, _) in zip(self.marks, self.marks[1:]))
        return {"before_first_s": self.marks[0][0] - start, "between_s": between, "after_last_s": end - self.marks[-1][1]}


class GcWatch:
    """The garbage collector's collections and pauses while the `with` body runs (gc.callbacks)."""

    def __init__(self):
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self.tracked = self.frozen = 0
        self._start = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.setdefault(info["generation"], []).append(time.perf_counter() - self._start)

    def __enter__(self):
        import gc

        self.tracked = len(gc.get_objects())
        self.frozen = gc.get_freeze_count()
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        import gc

        gc.callbacks.remove(self._callback)

    def summary(self) -> dict:
        return {"tracked_objects_at_start": self.tracked, "frozen_objects": self.frozen,
                "collections": {str(g): len(p) for g, p in self.pauses.items()},  # str: JSON's keys
                "pause_s": {str(g): round(sum(p), 4) for g, p in self.pauses.items()},
                "longest_pause_s": round(max((max(p) for p in self.pauses.values() if p), default=0.0), 4)}


def triton_kernel_variants() -> dict[str, int]:
    """Compiled variants (specializations) of each Triton kernel in ops/ so far, by kernel name."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return {}
    counts = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("ops.") or module is None:
            continue
        for obj in vars(module).values():
            fn = obj
            while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):  # an autotuner wraps its JITFunction
                fn = fn.fn
            if isinstance(fn, JITFunction) and hasattr(fn, "device_caches"):
                counts[fn.__name__] = sum(len(cache[0]) for cache in fn.device_caches.values())
    return counts


def run_transformers(args, model_dir: str, dummy: bool, prompts, max_tokens) -> dict:
    """The same workload through transformers' continuous batching (paged|sdpa attention)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dummy:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="paged|sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="paged|sdpa").to(device)
    model.eval()
    gen = GenerationConfig(do_sample=True, temperature=args.temperature, max_new_tokens=max(max_tokens), eos_token_id=-1)
    with model.continuous_batching_context_manager(generation_config=gen) as manager:
        def run(batch_prompts, batch_max):
            for i, (p, m) in enumerate(zip(batch_prompts, batch_max)):
                manager.add_request(p, request_id=f"r{run.calls}-{i}", max_new_tokens=m, eos_token_id=-1)
            done, tokens = 0, 0
            while done < len(batch_prompts):
                result = manager.get_result(timeout=1)
                if result is not None and result.is_finished():
                    done += 1
                    tokens += len(result.generated_tokens)
            run.calls += 1
            return tokens

        run.calls = 0
        run(prompts[:2], [8, 8])  # warm-up
        start = time.perf_counter()
        out_tokens = run(prompts, max_tokens)
        elapsed = time.perf_counter() - start
    return throughput_figures("transformers", elapsed, len(prompts), sum(len(p) for p in prompts), out_tokens)


def library_versions() -> dict[str, str]:
    """What ran: a peer's speed (transformers) or a kernel's can move with its version."""
    import importlib.metadata

    versions = {}
    for name in ("torch", "transformers", "triton"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


STEP_PHASE_BOUNDS = (0, 1, 16, 64, 128, 192)  # lower bounds of the batch-size classes step_phases groups steps by


def step_phases(per_step: list[tuple[int, float, float]]) -> list[dict]:
    """The timed run's steps grouped by how many sequences each scheduled: per class, the steps, their
    seconds in all, and a step's mean host work and wait for the device in ms. A class whose wait is near
    0 was host-bound; one that waits is device-bound (where the run's time goes, batch by batch). The host
    work's 90th percentile and maximum too: with one step in flight, a step whose host work outlasts the
    device's step leaves the GPU idle even where the mean does not."""
    phases = []
    for i, low in enumerate(STEP_PHASE_BOUNDS):
        high = STEP_PHASE_BOUNDS[i + 1] if i + 1 < len(STEP_PHASE_BOUNDS) else None
        rows = [(host, wait) for n, host, wait in per_step if n >= low and (high is None or n < high)]
        if rows:
            phases.append({"min_seqs": low, "max_seqs": None if high is None else high - 1, "steps": len(rows),
                           "seconds": sum(h + w for h, w in rows),
                           "host_ms": 1e3 * sum(h for h, _ in rows) / len(rows),
                           "wait_ms": 1e3 * sum(w for _, w in rows) / len(rows),
                           "host_ms_p90": 1e3 * sorted(h for h, _ in rows)[int(0.9 * (len(rows) - 1))],
                           "host_ms_max": 1e3 * max(h for h, _ in rows)})
    return phases


def throughput_figures(system: str, elapsed: float, requests: int, in_tokens: int, out_tokens: int) -> dict:
    """The figures every system compared reports, from one timed run."""
    return {
        "system": system,
        "elapsed_s": elapsed,
        "requests": requests,
        "prompt_tokens": in_tokens,
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / elapsed,
        "total_tok_s": (in_tokens + out_tokens) / elapsed,
        "req_s": requests / elapsed,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b", help="qwen3-0.6b | llama-3.1-8b | llama-3.1-70b | checkpoint dir")
    p.add_argument("--workload", choices=["nano", "fixed", "prefix"], default="nano")
    p.add_argument("--num-layers", type=int, default=None,
                   help="random-weight models: keep only this many layers (e.g. a 70B-shaped model on 2 GPUs)")
    p.add_argument("--prefix-len", type=int, default=2000, help="prefix: shared system prompt length")
    p.add_argument("--suffix-len", type=int, default=32, help="prefix: each request's own tokens")
    p.add_argument("--num-requests", type=int, default=1000, help="fixed: number of requests")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="run only the first N requests of the workload")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--quantization", choices=list(QUANTIZATION_METHODS), default=None,
                   help="random-weight models: awq/gptq declare a 4-bit checkpoint, int8/bitsandbytes quantize at load; "
                        "a checkpoint dir: as LLM(quantization=...) (default: the checkpoint's own)")
    p.add_argument("--act-order", action="store_true",
                   help="with --quantization gptq on a random-weight model: an act-order (desc_act) checkpoint, its "
                        "inputs in a random group order (sorted at load, x gathered each call)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs 0..N-1, one worker process each")
    p.add_argument("--disable-custom-all-reduce", action="store_true",
                   help="tensor parallelism: NCCL for every all-reduce (the engine's --disable-custom-all-reduce)")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto (the model's) or fp8 (e4m3: half the bytes of bf16)")
    p.add_argument("--mixed-cuda-graph-sizes", type=int, nargs="+", default=None,
                   help="token counts of prefill / mixed steps to capture CUDA graphs for (default: 16 32 ... 2048 on one GPU; 0: none)")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="CUDA graphs around the eager model, no torch.compile")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="launch step N+1 before reading step N's tokens (default; --no-async-scheduling: one step at a time)")
    p.add_argument("--enable-prefix-caching", action="store_true")
    p.add_argument("--compare-hf", action="store_true", help="also run transformers' continuous batching on the same workload")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--no-tqdm", action="store_true")
    p.add_argument("--json-out", default=None)
    p.add_argument("--profile-steps", type=int, nargs=2, metavar=("FIRST", "COUNT"), default=None,
                   help="after the timed run, run the workload again with steps FIRST.. FIRST+COUNT-1 under the "
                        "torch profiler: GPU busy time a step, top GPU ops and host CUDA calls")
    p.add_argument("--trace-out", default=None, help="with --profile-steps: write the chrome trace here")
    p.add_argument("--host-profile", default=None, metavar="PATH",
                   help="run the timed generate under cProfile, write its stats here and print the top functions "
                        "(where the host's time a step goes; the throughput of such a run is not comparable)")
    p.add_argument("--greedy-check", type=int, default=0, metavar="N",
                   help="after the timed run, N fixed prompts greedy (32 tokens each), their tokens in the JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    dummy = not os.path.isdir(args.model)
    if args.act_order and not dummy:
        p.error("--act-order makes a random-weight GPTQ model; a checkpoint directory says for itself")
    model_dir = synthetic_model_dir(args.model, args.num_layers, args.quantization, args.act_order) if dummy else args.model
    # Random ids below 10,000 (nano-vllm's range), or below the vocabulary of a smaller model.
    with open(os.path.join(model_dir, "config.json")) as f:
        vocab = min(10000, json.load(f)["vocab_size"])
    if args.workload == "nano":
        prompts, max_tokens = nano_workload()
    elif args.workload == "prefix":
        prompts, max_tokens = prefix_workload(args.num_requests, args.prefix_len, args.suffix_len, args.output_len, vocab)
        args.temperature = 0.0  # greedy, so outputs with and without caching can be compared
    else:
        prompts, max_tokens = fixed_workload(args.num_requests, args.input_len, args.output_len, vocab)
    if args.limit:
        prompts, max_tokens = prompts[: args.limit], max_tokens[: args.limit]
    results = []
    try:
        if not args.skip_engine:
            load_format = "dummy" if dummy else "auto"
            if args.workload == "prefix":
                for caching in (False, True):
                    args.enable_prefix_caching = caching
                    results.append(run_engine(args, model_dir, load_format, prompts, max_tokens))
            else:
                results.append(run_engine(args, model_dir, load_format, prompts, max_tokens))
        if args.compare_hf:
            import gc

            gc.collect()
            torch.cuda.empty_cache()
            results.append(run_transformers(args, model_dir, dummy, prompts, max_tokens))
    finally:
        if dummy:
            shutil.rmtree(model_dir, ignore_errors=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    header = {"model": args.model, "workload": args.workload, "quantization": args.quantization, "device": device,
              "versions": library_versions(), "args": vars(args)}
    for r in results:
        print(json.dumps({k: v for k, v in r.items() if k not in ("output_token_ids", "greedy_token_ids")}))
    print(f"\n{args.model}{' ' + args.quantization if args.quantization else ''} / {args.workload} on {device}: "
          f"{len(prompts)} requests ({', '.join(f'{k} {v}' for k, v in header['versions'].items())})")
    for r in results:
        label = r["system"] + (" +cache" if r.get("prefix_caching") else "")
        print(f"  {label:>14}: {r['output_tok_s']:10.1f} output tok/s  {r['total_tok_s']:10.1f} total tok/s  {r['req_s']:8.2f} req/s  ({r['elapsed_s']:.1f} s)")
        if "step_timings" in r:
            t = r["step_timings"]
            print(f"  {'':>14}  {t['steps']} steps: schedule {t['schedule_s']:.2f} s, execute {t['execute_s']:.2f} s, update {t['update_s']:.2f} s; startup {r['startup_s']:.1f} s")
            if r.get("outside_steps"):
                o = r["outside_steps"]
                print(f"  {'':>14}  outside the steps: {o['before_first_s']:.3f} s before the first, {o['between_s']:.3f} s "
                      f"between, {o['after_last_s']:.3f} s after the last")
            if t["steps"]:
                busy = t["schedule_s"] + t["execute_s"] + t["update_s"] - t["device_wait_s"]
                print(f"  {'':>14}  a step: {1e3 * busy / t['steps']:.3f} ms of host work, {1e3 * t['device_wait_s'] / t['steps']:.3f} ms "
                      "waiting for the device (host-bound when the wait is near 0)")
            for ph in r.get("step_phases") or []:
                seqs = f"{ph['min_seqs']}+" if ph["max_seqs"] is None else f"{ph['min_seqs']}-{ph['max_seqs']}"
                print(f"  {'':>14}    {seqs:>8} seqs: {ph['steps']:5d} steps, {ph['seconds']:6.2f} s; a step {ph['host_ms']:.3f} ms "
                      f"host (p90 {ph.get('host_ms_p90', 0):.3f}, max {ph.get('host_ms_max', 0):.3f}), {ph['wait_ms']:.3f} ms waiting")
            print(f"  {'':>14}  weights {r['weights_gib']:.2f} GiB ({r['quantization'] or 'unquantized'}), "
                  f"KV cache {r['kv_cache_gib']:.2f} GiB ({r['kv_blocks']} blocks, {r['kv_cache_dtype']})")
            g = r.get("gc")
            if g:
                print(f"  {'':>14}  GC: {g['tracked_objects_at_start']} objects tracked ({g.get('frozen_objects', 0)} frozen); "
                      f"collections by generation "
                      f"{g['collections']}, paused {sum(g['pause_s'].values()):.3f} s (longest {g['longest_pause_s']:.3f} s)")
            compiled = r.get("triton_compiles_in_timed_run") or {}
            print(f"  {'':>14}  Triton compiles in the timed run: {sum(compiled.values())}"
                  + (f" ({', '.join(f'{k} {v}' for k, v in compiled.items())})" if compiled else ""))
        if "profile" in r:
            print_summary(r["profile"])
    if args.workload == "prefix" and len(results) == 2:
        off, on = results
        print(f"  prefix caching on / off: {on['total_tok_s'] / off['total_tok_s']:.2f}x total tok/s, "
              f"hit rate {on['prefix_cache_hit_rate'] * 100:.1f}%, outputs equal: {on['output_token_ids'] == off['output_token_ids']}")
    elif len(results) == 2:
        print(f"  ratio engine / transformers (output tok/s): {results[0]['output_tok_s'] / results[1]['output_tok_s']:.1f}x")
    record = {**header, "results": [{k: v for k, v in r.items() if k != "output_token_ids"} for r in results]}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(record, f, indent=2)
    return record


if __name__ == "__main__":
    main()
