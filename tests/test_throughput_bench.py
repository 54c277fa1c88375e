"""perf/throughput.py on a tiny random-weight model: quantized runs load the quantized layers the flag
names, made directly in their stored form, and count every request and token."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch

import engine.model_runner
from engine.models.layers import LinearBase
from engine.quantization import AWQLinearMethod, BitsAndBytesLinearMethod, GPTQLinearMethod, Int8LinearMethod
from perf import throughput

# Llama-shaped, with every linear input a multiple of the AWQ/GPTQ group size (128).
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
    "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
NUM_REQUESTS, INPUT_LEN, OUTPUT_LEN = 3, 8, 5


@pytest.fixture
def tiny_model(tmp_path, monkeypatch) -> str:
    """`--model tiny-llama`: TINY_CONFIG among the published configs."""
    (tmp_path / "tiny-llama.json").write_text(json.dumps(TINY_CONFIG))
    monkeypatch.setattr(throughput, "CONFIGS", str(tmp_path))
    return "tiny-llama"


@pytest.fixture
def loaded_models(monkeypatch) -> list[torch.nn.Module]:
    """Every model the engine loads from here on."""
    models, load_model = [], engine.model_runner.load_model

    def recording_load_model(*args, **kwargs):
        models.append(load_model(*args, **kwargs))
        return models[-1]

    monkeypatch.setattr(engine.model_runner, "load_model", recording_load_model)
    return models


# quantization -> (the linear layers' method, their stored weight, its dtype)
STORED_AS = {
    "awq": (AWQLinearMethod, "qweight", torch.int32),
    "gptq": (GPTQLinearMethod, "qweight", torch.int32),
    "int8": (Int8LinearMethod, "weight", torch.int8),
    "bitsandbytes": (BitsAndBytesLinearMethod, "weight", torch.int8),
}


@pytest.mark.parametrize("quantization", ["awq", "gptq", "int8", pytest.param("bitsandbytes", marks=pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is an optional dependency"))])
def test_quantized_run_loads_quantized_layers_and_counts_every_token(tiny_model, loaded_models, tmp_path, quantization):
    json_out = tmp_path / "run.json"
    record = throughput.main([
        "--model", tiny_model, "--quantization", quantization, "--workload", "fixed",
        "--num-requests", str(NUM_REQUESTS), "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN),
        "--max-model-len", "64", "--max-num-seqs", "4", "--no-tqdm", "--json-out", str(json_out),
    ])
    assert json.loads(json_out.read_text()) == record
    assert record["quantization"] == quantization
    assert record["versions"]["torch"] == torch.__version__
    assert set(record["versions"]) == {"torch", "transformers", "triton"}
    (run,) = record["results"]
    assert run["quantization"] == quantization
    assert (run["requests"], run["prompt_tokens"], run["output_tokens"]) == (
        NUM_REQUESTS, NUM_REQUESTS * INPUT_LEN, NUM_REQUESTS * OUTPUT_LEN)
    assert run["kv_cache_gib"] > 0

    (model,) = loaded_models
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    assert len(linears) == 4 * TINY_CONFIG["num_hidden_layers"]  # qkv, o, gate_up, down
    method, weight_name, weight_dtype = STORED_AS[quantization]
    for layer in linears:  # made in their stored form: no float weight anywhere
        assert isinstance(layer.quant_method, method)
        assert getattr(layer, weight_name).dtype == weight_dtype
        assert not any(p.dtype == torch.bfloat16 and p.dim() == 2 for p in layer.parameters())
    assert model.lm_head.weight.dtype == torch.bfloat16  # embedding and head stay in the model dtype
    parameters = sum(p.numel() * p.element_size() for p in (*model.parameters(), *model.buffers()))
    assert run["weights_gib"] == pytest.approx(parameters / 2**30)


def test_act_order_gptq_run_gathers_each_layers_inputs_in_a_shuffled_group_order(tiny_model, loaded_models):
    record = throughput.main([
        "--model", tiny_model, "--quantization", "gptq", "--act-order", "--workload", "fixed",
        "--num-requests", "1", "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN),
        "--max-model-len", "64", "--no-tqdm",
    ])
    assert record["results"][0]["output_tokens"] == OUTPUT_LEN
    (model,) = loaded_models
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    # What a real act-order checkpoint costs: each layer of more than one group gathers its inputs (here the
    # down projections, 256 inputs; the others have 128, one group, which needs no order).
    gathering = [m for m in linears if m.g_idx.max() > 0]
    assert len(gathering) == TINY_CONFIG["num_hidden_layers"]
    assert all(m.input_order is not None and not m.act_order for m in gathering)
    with pytest.raises(ValueError, match="--act-order is for --quantization gptq"):
        throughput.main(["--model", tiny_model, "--quantization", "awq", "--act-order", "--workload", "fixed"])


def test_profile_window_covers_the_steps_asked_and_finds_the_work(tiny_model, tmp_path):
    record = throughput.main([
        "--model", tiny_model, "--workload", "fixed", "--num-requests", "2", "--input-len", str(INPUT_LEN),
        "--output-len", "8", "--max-model-len", "64", "--no-tqdm", "--profile-steps", "3", "4",
        "--trace-out", str(tmp_path / "trace.json"),
    ])
    profile = record["results"][0]["profile"]
    assert (profile["first_step"], profile["steps"]) == (3, 4)
    assert profile["wall_ms_per_step"] > 0
    # No GPU here: no device time, and the window's trace holds the steps' own work.
    assert profile["gpu_busy_ms_per_step"] == 0 and profile["top_gpu_ops"] == []
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert any("linear" in e.get("name", "") or "mm" in e.get("name", "") for e in trace["traceEvents"])


def test_profile_window_with_tensor_parallelism_profiles_each_worker_too(tiny_model, capfd):
    from engine import tensor_parallel

    run_worker = tensor_parallel.run_worker
    record = throughput.main([
        "--model", tiny_model, "--workload", "fixed", "--num-requests", "2", "--input-len", str(INPUT_LEN),
        "--output-len", "8", "--max-model-len", "64", "--no-tqdm", "--profile-steps", "3", "4",
        "--tensor-parallel-size", "2",
    ])
    assert record["results"][0]["profile"]["steps"] == 4
    out = capfd.readouterr().out
    assert "tensor-parallel worker (pid" in out and out.count("profiled steps 3..6") == 2, out[-2000:]
    assert tensor_parallel.run_worker is run_worker  # put back for whatever starts workers next


def test_profile_window_past_the_last_step_is_an_error(tiny_model):
    with pytest.raises(RuntimeError, match="fewer than the window's first"):
        throughput.main(["--model", tiny_model, "--workload", "fixed", "--num-requests", "1", "--input-len", "8",
                         "--output-len", "2", "--max-model-len", "64", "--no-tqdm", "--profile-steps", "50", "2"])


def test_union_of_intervals_counts_overlaps_once():
    from perf.step_profile import _union_us

    assert _union_us([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
    assert _union_us([]) == 0


def test_fp8_kv_cache_run_reports_its_dtype_and_half_the_bytes_a_block(tiny_model):
    runs = {}
    for kv_cache_dtype in ("auto", "fp8"):
        record = throughput.main([
            "--model", tiny_model, "--workload", "fixed", "--num-requests", "2", "--input-len", "8", "--output-len", "4",
            "--max-model-len", "64", "--max-num-seqs", "4", "--no-tqdm", "--kv-cache-dtype", kv_cache_dtype,
        ])
        (runs[kv_cache_dtype],) = record["results"]
    assert runs["auto"]["kv_cache_dtype"] == "bfloat16" and runs["fp8"]["kv_cache_dtype"] == "float8_e4m3fn"
    assert runs["fp8"]["output_tokens"] == 2 * 4
    per_block = {k: r["kv_cache_gib"] / r["kv_blocks"] for k, r in runs.items()}
    assert per_block["fp8"] == pytest.approx(per_block["auto"] / 2)


def test_triton_kernel_variants_counts_each_ops_kernels_compiled_variants():
    """The "Triton compiles in the timed run" figure: a new entry in a kernel's compile cache counts for it
    (a fake entry here: compiling needs a GPU). Session 9's version counted nothing."""
    pytest.importorskip("triton")
    from triton.runtime.jit import JITFunction

    import ops.triton_gemv

    kernel = ops.triton_gemv._gemv_kernel
    if not isinstance(kernel, JITFunction):
        pytest.skip("the Triton interpreter is on: kernels are not compiled")
    before = throughput.triton_kernel_variants()
    assert "_gemv_kernel" in before
    kernel.device_caches["fake-device"] = ({"a": None, "b": None}, None, None, None, None)
    try:
        after = throughput.triton_kernel_variants()
    finally:
        del kernel.device_caches["fake-device"]
    assert after["_gemv_kernel"] == before["_gemv_kernel"] + 2
    assert {k: v for k, v in after.items() if k != "_gemv_kernel"} == {k: v for k, v in before.items() if k != "_gemv_kernel"}


def test_step_phases_group_every_timed_step_by_batch_size(tiny_model):
    """The timed run's steps, grouped by sequences scheduled: every step counted once, in its class."""
    phases = throughput.step_phases([(256, 0.004, 0.006), (200, 0.002, 0.0), (3, 0.001, 0.001), (0, 0.0005, 0.0)])
    assert [(p["min_seqs"], p["max_seqs"], p["steps"]) for p in phases] == [(0, 0, 1), (1, 15, 1), (192, None, 2)]
    assert [(p["seconds"], p["host_ms"], p["wait_ms"]) for p in phases] == [
        pytest.approx((0.0005, 0.5, 0.0)), pytest.approx((0.002, 1.0, 1.0)), pytest.approx((0.012, 3.0, 3.0))]
    assert (phases[2]["host_ms_p90"], phases[2]["host_ms_max"]) == pytest.approx((2.0, 4.0))  # p90 of two: the lower
    record = throughput.main(["--model", tiny_model, "--workload", "fixed", "--num-requests", "3", "--input-len", "8",
                              "--output-len", "5", "--max-model-len", "64", "--no-tqdm"])
    (run,) = record["results"]
    phases = run["step_phases"]
    assert sum(p["steps"] for p in phases) == run["step_timings"]["steps"]
    assert all(p["min_seqs"] in throughput.STEP_PHASE_BOUNDS for p in phases)
    assert sum(p["seconds"] for p in phases) <= run["elapsed_s"]
    outside = run["outside_steps"]
    assert min(outside.values()) >= 0 and sum(outside.values()) < run["elapsed_s"]


def test_step_marks_split_the_time_outside_the_steps_and_unwrap_the_engine():
    """StepMarks: the wall time before the first step call, between calls and after the last."""

    class Engine:
        def step(self):
            time.sleep(0.01)
            return ["out"]

    engine = Engine()
    marks = throughput.StepMarks(engine)
    start = time.perf_counter()
    with marks:
        time.sleep(0.02)
        assert engine.step() == ["out"]
        time.sleep(0.03)
        engine.step()
        time.sleep(0.04)
    end = time.perf_counter()
    assert "step" not in vars(engine) and engine.step() == ["out"]  # the class's method again
    assert len(marks.marks) == 2 and all(b - a >= 0.01 for a, b in marks.marks)
    outside = marks.outside(start, end)
    assert outside["before_first_s"] >= 0.02 and outside["between_s"] >= 0.03 and outside["after_last_s"] >= 0.04
    in_steps = sum(b - a for a, b in marks.marks)
    assert sum(outside.values()) + in_steps == pytest.approx(end - start)


def test_phases_split_the_window_into_busy_and_idle_time_by_the_step_it_began_in():
    from perf.step_profile import _phases

    # Two steps from t=0 and t=100 (us); the GPU busy 10-40 and 50-130 (one overlap inside), then idle to 150.
    rows = _phases([(0, 20), (100, 150)], ["192+ seqs", "1-15 seqs"], [(10, 40), (50, 130), (60, 70)])
    by = {r["phase"]: r for r in rows}
    assert by["192+ seqs"] == {"phase": "192+ seqs", "steps": 1, "wall_ms": 0.1, "gpu_busy_ms": 0.11, "gpu_idle_ms": 0.01}
    assert by["1-15 seqs"]["gpu_busy_ms"] == 0 and abs(by["1-15 seqs"]["gpu_idle_ms"] - 0.02) < 1e-12
    assert abs(by["1-15 seqs"]["wall_ms"] - 0.05) < 1e-12
    assert _phases([], [], [(0, 1)]) == []


def test_idle_gaps_name_the_step_and_the_ops_on_either_side():
    from types import SimpleNamespace

    from perf.step_profile import _idle_gaps

    def op(start, stop, name):
        return SimpleNamespace(time_range=SimpleNamespace(start=start, end=stop), name=name)

    # Steps from t=0 and t=100 (us). The GPU: a 10-50 with b 20-30 inside it, then c from 80, d from 140.
    device = [op(10, 50, "a"), op(20, 30, "b"), op(80, 120, "c"), op(140, 150, "d")]
    gaps = _idle_gaps([(0, 5), (100, 110)], ["192+ seqs", "1-15 seqs"], device, first_step=7)
    assert [(g["step"], g["phase"], g["after"], g["before"]) for g in gaps] == [
        (7, "192+ seqs", "a", "c"), (8, "1-15 seqs", "c", "d")]
    assert abs(gaps[0]["idle_ms"] - 0.03) < 1e-12 and abs(gaps[0]["into_step_ms"] - 0.05) < 1e-12
    assert abs(gaps[1]["idle_ms"] - 0.02) < 1e-12 and abs(gaps[1]["into_step_ms"] - 0.02) < 1e-12
