"""perf/ tools: serve_bench.py against the real server, its metric arithmetic on synthetic timings,
latency.py on a tiny model, and plot.py's PNGs from their JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import httpx
import pytest

from perf import latency, plot, serve_bench
from perf.bench_metrics import (
    ChunkClock,
    RequestResult,
    arrival_offsets,
    distribution,
    meets_slos,
    parse_goodput,
    summarize,
)
from tests.test_server import ServerProcess

MAX_MODEL_LEN = 512
STATS = ("mean", "median", "std", "p90", "p99")


@pytest.fixture(scope="module")
def vocab_size(llama_checkpoint) -> int:
    with open(f"{llama_checkpoint}/config.json") as f:
        return json.load(f)["vocab_size"]


@pytest.fixture(scope="module")
def server(llama_checkpoint, tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("perf-server") / "server.log", "--model", llama_checkpoint,
                         "--max-model-len", str(MAX_MODEL_LEN), "--num-gpu-blocks-override", "256")
    yield proc
    assert proc.stop() == 0, proc.log()


def bench(server, vocab_size, *flags: str) -> dict:
    return serve_bench.main(["--base-url", server.url, "--vocab-size", str(vocab_size), "--disable-tqdm", *flags])


SERVE_FLAGS = ["--dataset", "random", "--num-prompts", "6", "--input-len", "24", "--output-len", "8",
               "--range-ratio", "0.5", "--seed", "3", "--request-rate", "100", "--ignore-eos",
               "--goodput", "ttft:600000", "tpot:600000", "e2el:600000"]


@pytest.fixture(scope="module")
def serve_run(server, vocab_size, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("serve-bench") / "run.json")
    bench(server, vocab_size, *SERVE_FLAGS, "--label", "tiny", "--result-json", path)
    return path


# ---- serve_bench.py against the server ----------------------------------------------------------------


def test_serve_bench_reports_every_metric_with_exact_token_counts(serve_run, vocab_size):
    run = json.loads(Path(serve_run).read_text())
    expected = serve_bench.random_requests(6, 24, 8, 0.5, vocab_size, seed=3)
    assert (run["completed"], run["failed"], run["errors"]) == (6, 0, [])
    assert run["input_lens"] == [r.prompt_len for r in expected]
    assert run["output_lens"] == [r.output_len for r in expected]  # ignore_eos: exactly what was asked
    assert len({r.output_len for r in expected}) > 1  # the range ratio varied them
    assert run["total_output_tokens"] == sum(r.output_len for r in expected)
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in STATS:
            assert run[f"{stat}_{metric}_ms"] is not None and run[f"{stat}_{metric}_ms"] >= 0
    for key in ("request_throughput", "output_throughput", "total_token_throughput", "request_goodput"):
        assert run[key] > 0
    assert run["request_goodput"] == pytest.approx(run["request_throughput"])  # SLOs nobody misses
    assert run["output_throughput"] == pytest.approx(run["total_output_tokens"] / run["duration"])
    for ttft, e2el, itl, n in zip(run["ttfts"], run["e2els"], run["itls"], run["output_lens"]):
        assert 0 < ttft <= e2el < run["duration"]
        assert sum(itl) == pytest.approx(e2el - ttft)
        assert 0 < len(itl) <= n - 1  # a chunk per token, fewer when a token ends mid-character
    tpots = [(e - t) / (n - 1) for t, e, n in zip(run["ttfts"], run["e2els"], run["output_lens"])]
    assert run["mean_tpot_ms"] == pytest.approx(1e3 * np.mean(tpots))
    assert run["request_rate"] == 100 and run["max_concurrency"] is None


def test_serve_bench_chat_with_a_concurrency_cap(server, vocab_size, capsys):
    run = bench(server, vocab_size, "--endpoint", "/v1/chat/completions", "--num-prompts", "3", "--input-len", "16",
                "--output-len", "5", "--ignore-eos", "--max-concurrency", "1")
    assert run["completed"] == 3 and run["output_lens"] == [5, 5, 5]
    assert all(n > 0 for n in run["input_lens"])  # the server's count: the chat template's tokens too
    # One at a time: each request is sent after the one before it ended.
    assert all(later >= start + e2el for start, e2el, later in zip(run["start_times"], run["e2els"], run["start_times"][1:]))
    table = capsys.readouterr().out
    assert "Serving Benchmark Result" in table and "Median TPOT (ms):" in table and "P99 ITL (ms):" in table


def test_serve_bench_counts_refused_requests_as_failed(server, vocab_size, capsys):
    run = bench(server, vocab_size, "--num-prompts", "2", "--input-len", str(MAX_MODEL_LEN), "--output-len", "4",
                "--num-warmups", "0")
    assert (run["completed"], run["failed"]) == (0, 2)
    assert all("HTTP 400" in error for error in run["errors"])
    assert run["median_ttft_ms"] is None and run["request_throughput"] == 0
    assert "error: HTTP 400" in capsys.readouterr().out


def _finished_requests(server) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("engine_request_success_total"))


def test_serve_bench_warm_up_requests_run_before_the_clock_and_are_not_counted(server, vocab_size):
    before = _finished_requests(server)
    run = bench(server, vocab_size, "--num-prompts", "2", "--input-len", "16", "--output-len", "3", "--ignore-eos",
                "--num-warmups", "2")
    assert (run["completed"], run["num_warmups"]) == (2, 2) and len(run["ttfts"]) == 2
    assert _finished_requests(server) - before == 4  # the server saw the two warm-ups too


def test_serve_bench_opens_its_connection_before_the_clock_even_with_model_given(server, vocab_size, capsys):
    # The server's access log: /v1/models comes before the timed requests, which then find the
    # connection open (a fresh client's first connection is the client's cost, not the server's).
    name = bench(server, vocab_size, "--num-prompts", "1", "--input-len", "8", "--output-len", "2")["model"]
    log_before = server.log()
    run = bench(server, vocab_size, "--model", name, "--num-warmups", "0", "--num-prompts", "2", "--input-len", "8",
                "--output-len", "2", "--ignore-eos")
    assert run["completed"] == 2
    new_lines = [line for line in server.log()[len(log_before):].splitlines() if '"GET /v1/models' in line or '"POST' in line]
    assert '"GET /v1/models' in new_lines[0] and all('"POST' in line for line in new_lines[1:3]), new_lines
    bench(server, vocab_size, "--model", "not-served", "--num-warmups", "0", "--num-prompts", "1", "--input-len", "8",
          "--output-len", "2")
    assert "--model 'not-served' is not among the models the server lists" in capsys.readouterr().err


def test_serve_bench_stops_when_its_warm_up_request_fails(server, vocab_size):
    with pytest.raises(SystemExit, match="the warm-up request failed .*HTTP 400"):
        bench(server, vocab_size, "--num-prompts", "2", "--input-len", str(MAX_MODEL_LEN), "--output-len", "4")


# ---- the arithmetic -------------------------------------------------------------------------------


def test_distribution_is_in_ms_with_linear_percentiles():
    stats = distribution([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert stats == pytest.approx({"mean": 50.5, "median": 50.5, "std": math.sqrt((100**2 - 1) / 12),
                                   "p90": 90.1, "p99": 99.01})
    assert distribution([]) == dict.fromkeys(STATS)


def test_chunk_clock_gives_ttft_itl_and_e2el():
    result = RequestResult()
    clock = ChunkClock(result, sent_at=10.0)
    for now in (10.5, 10.6, 10.8, 11.0):
        clock.chunk(now)
    assert result.ttft == pytest.approx(0.5) and result.latency == pytest.approx(1.0)
    assert result.itl == pytest.approx([0.1, 0.2, 0.2])


def test_tpot_excludes_the_first_token_and_one_token_requests():
    assert RequestResult(success=True, ttft=0.1, latency=1.0, output_tokens=10).tpot == pytest.approx(0.1)
    assert RequestResult(success=True, ttft=0.1, latency=0.1, output_tokens=1).tpot is None
    results = [
        RequestResult(success=True, prompt_len=5, output_tokens=10, ttft=0.1, latency=1.0, itl=[0.1] * 9),
        RequestResult(success=True, prompt_len=7, output_tokens=1, ttft=0.3, latency=0.3),
        RequestResult(success=False, prompt_len=100, error="HTTP 500"),
    ]
    summary = summarize(results, duration_s=2.0)
    assert (summary["completed"], summary["failed"]) == (2, 1)
    assert (summary["total_input_tokens"], summary["total_output_tokens"]) == (12, 11)
    assert summary["request_throughput"] == 1.0 and summary["output_throughput"] == 5.5
    assert summary["total_token_throughput"] == 11.5
    assert summary["mean_tpot_ms"] == pytest.approx(100.0)  # the one-token request has no TPOT
    assert summary["mean_ttft_ms"] == pytest.approx(200.0)  # but it has a TTFT
    assert summary["mean_e2el_ms"] == pytest.approx(650.0)
    assert summary["median_itl_ms"] == pytest.approx(100.0)
    assert summary["request_goodput"] is None


def test_goodput_counts_requests_that_meet_every_slo():
    def request(ttft_ms, e2el_ms, tokens, success=True):
        return RequestResult(success=success, output_tokens=tokens, ttft=ttft_ms / 1e3, latency=e2el_ms / 1e3)

    slos = parse_goodput(["ttft:100", "tpot:10"])
    assert slos == {"ttft": 100.0, "tpot": 10.0}
    good = request(100, 190, 10)  # TPOT 10 ms: on the limit is good
    slow_start = request(101, 150, 10)
    slow_tokens = request(50, 200, 10)  # TPOT 16.7 ms
    one_token = request(80, 80, 1)  # TPOT counts as 0 (vLLM)
    failed = request(1, 2, 10, success=False)
    assert [meets_slos(r, slos) for r in (good, slow_start, slow_tokens, one_token, failed)] == [True, False, False, True, False]
    summary = summarize([good, slow_start, slow_tokens, one_token, failed], duration_s=4.0, slos_ms=slos)
    assert summary["request_goodput"] == 0.5
    assert meets_slos(slow_tokens, parse_goodput(["e2el:200"]))


@pytest.mark.parametrize("spec", ["ttft", "itl:5", "ttft:fast", "tpot:-1"])
def test_bad_goodput_slos_are_refused(spec):
    with pytest.raises(ValueError):
        parse_goodput([spec])


@pytest.mark.parametrize("burstiness", [1.0, 0.5, 4.0])
def test_arrivals_have_the_rate_and_burstiness_asked_and_repeat_with_the_seed(burstiness):
    offsets = arrival_offsets(20001, request_rate=8.0, burstiness=burstiness, seed=1)
    assert offsets[0] == 0 and np.all(np.diff(offsets) >= 0)
    gaps = np.diff(offsets)
    assert gaps.mean() == pytest.approx(1 / 8.0, rel=0.03)
    # Gamma(shape k): coefficient of variation 1 / sqrt(k); 1 for a Poisson process.
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)
    assert np.array_equal(offsets, arrival_offsets(20001, 8.0, burstiness, seed=1))
    assert not np.array_equal(offsets, arrival_offsets(20001, 8.0, burstiness, seed=2))


def test_an_infinite_rate_sends_everything_at_once():
    assert np.array_equal(arrival_offsets(5, math.inf), np.zeros(5))
    with pytest.raises(ValueError):
        arrival_offsets(5, 0.0)


def test_random_dataset_is_seeded_and_within_the_range():
    a = serve_bench.random_requests(200, 100, 20, 0.25, vocab_size=50, seed=7)
    assert [r.prompt for r in a] == [r.prompt for r in serve_bench.random_requests(200, 100, 20, 0.25, 50, seed=7)]
    assert all(75 <= r.prompt_len == len(r.prompt) <= 125 and 15 <= r.output_len <= 25 for r in a)
    assert all(0 <= t < 50 for r in a for t in r.prompt)
    fixed = serve_bench.random_requests(10, 100, 20, 0.0, vocab_size=50, seed=7)
    assert {(r.prompt_len, r.output_len) for r in fixed} == {(100, 20)}


# ---- latency.py -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def latency_run(llama_checkpoint, tmp_path_factory) -> tuple[dict, str]:
    out_dir = tmp_path_factory.mktemp("latency")
    path = str(out_dir / "latency.json")
    latency.main([
        "--model", llama_checkpoint, "--prefill-lens", "8", "40", "--batch-sizes", "1", "3", "--context-lens", "16",
        "--iters", "2", "--decode-steps", "3", "--warmup-steps", "1", "--server", "--server-requests", "3",
        "--sequential-requests", "2", "--input-len", "12", "--output-len", "4", "--trace", str(out_dir / "traces"), "--trace-steps", "1",
        "--out", path, "--max-model-len", "256", "--num-gpu-blocks-override", "64",
    ])
    return json.loads(Path(path).read_text()), path


def test_latency_sweeps_write_every_phase(latency_run):
    run, _ = latency_run
    assert run["tool"] == "latency" and run["device"] == "cpu"
    assert [p["prompt_len"] for p in run["prefill"]] == [8, 40]
    for p in run["prefill"]:
        assert p["steps"] == 1 and p["time_ms"] > 0 and len(p["times_ms"]) == 2
        assert set(p["phases_ms"]) == set(latency.PHASES)
        assert p["phases_ms"]["forward"] > 0
    assert [(d["batch_size"], d["context_len"]) for d in run["decode"]] == [(1, 16), (3, 16)]
    for d in run["decode"]:
        assert d["steps"] == 3 and d["step_ms"] > 0
        assert d["tokens_per_s"] == pytest.approx(d["batch_size"] / d["step_ms"] * 1e3)
        assert set(d["phases_ms"]) == set(latency.PHASES)
        # The phases partition the step: their sum is the mean step time.
        assert sum(d["phases_ms"].values()) == pytest.approx(d["step_ms_mean"])
        assert all(d["phases_ms"][phase] >= 0 for phase in latency.PHASES if phase != "other")
        assert set(d["engine_ms"]) == {"schedule", "execute", "update", "device_wait"}
        assert 0 <= d["engine_ms"]["device_wait"] <= d["engine_ms"]["execute"]  # the wait is part of execute


def test_latency_skips_a_decode_point_the_kv_cache_cannot_hold(llama_checkpoint):
    record = latency.main(["--model", llama_checkpoint, "--prefill-lens", "--batch-sizes", "8", "--context-lens", "200",
                           "--max-model-len", "256", "--num-gpu-blocks-override", "16"])
    assert "KV blocks" in record["decode"][0]["skipped"]


def test_latency_stub_model_times_host_work_without_the_model(llama_checkpoint, monkeypatch):
    from engine.models.llama import LlamaForCausalLM

    def no_forward(*args, **kwargs):
        raise AssertionError("the stub must replace the model")

    record = latency.main(["--model", llama_checkpoint, "--stub-model", "--prefill-lens", "--batch-sizes", "4",
                           "--context-lens", "16", "--decode-steps", "3", "--max-model-len", "256",
                           "--num-gpu-blocks-override", "64", "--server", "--skip-sweeps", "--server-requests", "2",
                           "--input-len", "8", "--output-len", "3"])
    assert record["stub_model"]
    monkeypatch.setattr(LlamaForCausalLM, "forward", no_forward)
    record = latency.main(["--model", llama_checkpoint, "--stub-model", "--prefill-lens", "--batch-sizes", "4",
                           "--context-lens", "16", "--decode-steps", "3", "--max-model-len", "256",
                           "--num-gpu-blocks-override", "64", "--stub-step-ms", "30"])
    (point,) = record["decode"]
    assert point["steps"] == 3 and point["phases_ms"]["lm_head"] == 0
    assert record["stub_step_ms"] == 30 and point["step_ms"] >= 30  # the stand-in for device time is spent


def test_latency_server_compares_the_same_requests_through_each_layer(latency_run):
    server = latency_run[0]["server"]
    assert set(server["layers"]) == {"engine", "async", "http"}
    for layer, modes in server["layers"].items():
        for mode, num in (("sequential", 2), ("concurrent", 3)):
            s = modes[mode]
            assert (s["completed"], s["total_input_tokens"], s["total_output_tokens"]) == (num, 12 * num, 4 * num), (layer, mode)
            assert 0 < s["median_ttft_ms"] <= s["median_e2el_ms"]
    assert set(server["http_vs_engine"]) == {"sequential", "concurrent"}


def test_latency_trace_is_a_chrome_trace_with_the_phases(latency_run):
    trace_dir = Path(latency_run[1]).parent / "traces"
    names = ["decode_b1_c16", "decode_b3_c16", "prefill_40", "prefill_8"]
    assert sorted(p.name for p in trace_dir.iterdir()) == sorted([f"{n}.json" for n in names] + [f"{n}.txt" for n in names])
    with open(trace_dir / "decode_b3_c16.json") as f:
        names = {event.get("name") for event in json.load(f)["traceEvents"]}
    assert {"schedule", "forward", "sample", "detokenize"} <= names
    table = (trace_dir / "decode_b3_c16.txt").read_text()
    assert "Self CPU" in table and "forward" in table


# ---- plot.py --------------------------------------------------------------------------------------


def test_plot_writes_readable_pngs(serve_run, latency_run, tmp_path):
    # Several serving runs: by request rate, and by concurrency.
    base = json.loads(Path(serve_run).read_text())
    runs = []
    for i, (rate, concurrency) in enumerate([(1, None), (4, None), ("inf", None), ("inf", 1), ("inf", 4)]):
        path = tmp_path / f"serve-{i}.json"
        scale = 1 + i / 4
        path.write_text(json.dumps({**base, "request_rate": rate, "max_concurrency": concurrency,
                                    "median_ttft_ms": base["median_ttft_ms"] * scale}))
        runs.append(str(path))
    out_dir = tmp_path / "plots"
    written = plot.plot_all(runs + [latency_run[1]], str(out_dir))
    names = sorted(Path(p).name for p in written)
    assert names == sorted([
        "serve_latency_vs_rate.png", "serve_throughput_vs_concurrency.png", "latency_decode_step.png",
        "latency_prefill.png", f"latency_phases_{plot._slug(plot.latency_label(latency_run[0]))}.png",
        f"latency_server_{plot._slug(plot.latency_label(latency_run[0]))}.png",
    ])
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        height, width, _ = matplotlib.image.imread(path).shape
        assert width >= 600 and height >= 400
        assert Path(path).stat().st_size > 15_000  # drawn, not blank


def test_plot_refuses_a_json_of_another_kind(tmp_path):
    other = tmp_path / "other.json"
    other.write_text('{"results": []}')
    with pytest.raises(ValueError, match="not a result"):
        plot.load([str(other)])


def test_synthetic_model_keeps_the_published_shape_and_can_be_cut_short():
    from perf.throughput import synthetic_model_dir

    full = json.loads((Path(synthetic_model_dir("llama-3.1-70b")) / "config.json").read_text())
    cut = json.loads((Path(synthetic_model_dir("llama-3.1-70b", num_layers=20)) / "config.json").read_text())
    assert full["num_hidden_layers"] == 80 and cut["num_hidden_layers"] == 20
    assert {k: v for k, v in cut.items() if k != "num_hidden_layers"} == {k: v for k, v in full.items() if k != "num_hidden_layers"}
