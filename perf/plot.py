"""PNG plots from saved results of perf/serve_bench.py and perf/latency.py.

    python perf/plot.py results/*.json --out-dir perf/plots

serve_bench runs (vLLM's benchmark_serving JSON works too), one line per --label (default: the
model, dataset and lengths):
  serve_latency_vs_rate.png           TTFT and TPOT p50 / p90 / p99 against request rate (runs
                                      without --max-concurrency)
  serve_throughput_vs_concurrency.png output-token throughput and median TPOT against
                                      --max-concurrency (runs with it)
latency.py runs:
  latency_decode_step.png             decode step time against batch size, per context length
  latency_prefill.png                 prefill time against prompt length
  latency_phases_<label>.png          where a decode step's time goes, per sweep point
  latency_server_<label>.png          the same requests through the engine, async front and HTTP
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PHASES = ("schedule", "prepare", "forward", "lm_head", "sample", "detokenize", "outputs", "update_other", "other")
PERCENTILE_STYLES = {"median": "-", "p90": "--", "p99": ":"}


def load(paths: list[str]) -> tuple[list[dict], list[dict]]:
    """(serve runs, latency runs); files of neither kind are refused."""
    serve, latency = [], []
    for path in paths:
        with open(path) as f:
            record = json.load(f)
        if record.get("tool") == "latency":
            latency.append(record)
        elif "request_throughput" in record and "median_ttft_ms" in record:
            serve.append(record)
        else:
            raise ValueError(f"{path}: not a result of serve_bench.py or latency.py")
    return serve, latency


def _model_name(model: str | None) -> str:
    return os.path.basename(str(model).rstrip("/")) or str(model)


def serve_label(run: dict) -> str:
    if run.get("label"):
        return run["label"]
    lengths = f" {run['input_len']}/{run['output_len']}" if run.get("input_len") is not None else ""
    return f"{_model_name(run.get('model') or run.get('model_id'))} {run.get('dataset', '')}{lengths}".strip()


def latency_label(run: dict) -> str:
    return run.get("label") or f"{_model_name(run['model'])} ({run['device']})"


def _rate(run: dict) -> float:
    rate = run.get("request_rate", "inf")
    return math.inf if rate in ("inf", None) else float(rate)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_")


def _log2_axis(ax, values: list[float]) -> None:
    """A log2 axis ticked at the values measured, labelled as plain numbers."""
    ax.set_xscale("log", base=2)
    ticks = sorted(set(values))
    ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
    ax.minorticks_off()


def _save(fig, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- serving ----------------------------------------------------------------------------------------


def plot_latency_vs_rate(runs: list[dict], out_dir: str) -> str:
    rates = sorted({_rate(r) for r in runs})
    x_of = {rate: i for i, rate in enumerate(rates)}
    by_label = defaultdict(list)
    for run in runs:
        by_label[serve_label(run)].append(run)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, (label, series) in zip(colors * 8, sorted(by_label.items())):
        series.sort(key=_rate)
        xs = [x_of[_rate(r)] for r in series]
        for ax, metric in zip(axes, ("ttft", "tpot")):
            for stat, style in PERCENTILE_STYLES.items():
                ys = [r.get(f"{stat}_{metric}_ms") for r in series]
                ax.plot(xs, [math.nan if y is None else y for y in ys], style, marker="o", color=color,
                        label=f"{label} {stat}")
    for ax, title in zip(axes, ("Time to first token", "Time per output token")):
        ax.set_xticks(range(len(rates)), ["inf" if math.isinf(r) else f"{r:g}" for r in rates])
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    return _save(fig, out_dir, "serve_latency_vs_rate.png")


def plot_throughput_vs_concurrency(runs: list[dict], out_dir: str) -> str:
    by_label = defaultdict(list)
    for run in runs:
        by_label[serve_label(run)].append(run)
    fig, (tput, tpot) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, series in sorted(by_label.items()):
        series.sort(key=lambda r: r["max_concurrency"])
        xs = [r["max_concurrency"] for r in series]
        tput.plot(xs, [r["output_throughput"] for r in series], marker="o", label=label)
        tpot.plot(xs, [math.nan if r["median_tpot_ms"] is None else r["median_tpot_ms"] for r in series],
                  marker="o", label=label)
    for ax, ylabel, title in ((tput, "output tokens/s", "Output throughput"), (tpot, "ms", "Median TPOT")):
        _log2_axis(ax, [r["max_concurrency"] for r in runs])
        ax.set_xlabel("max concurrency (requests in flight)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    tput.legend(fontsize=8)
    return _save(fig, out_dir, "serve_throughput_vs_concurrency.png")


# ---- engine latency ---------------------------------------------------------------------------------


def plot_decode_steps(runs: list[dict], out_dir: str) -> str:
    fig, (step, tput) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        by_context = defaultdict(list)
        for point in run["decode"]:
            if "skipped" not in point:
                by_context[point["context_len"]].append(point)
        for context, points in sorted(by_context.items()):
            points.sort(key=lambda p: p["batch_size"])
            xs = [p["batch_size"] for p in points]
            label = f"{latency_label(run)}, context {context}"
            step.plot(xs, [p["step_ms"] for p in points], marker="o", label=label)
            tput.plot(xs, [p["tokens_per_s"] for p in points], marker="o", label=label)
    for ax, ylabel, title in ((step, "ms per step (median)", "Decode step time"),
                              (tput, "tokens/s", "Decode throughput")):
        _log2_axis(ax, [p["batch_size"] for r in runs for p in r["decode"] if "skipped" not in p])
        ax.set_xlabel("batch size (sequences)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    step.legend(fontsize=8)
    return _save(fig, out_dir, "latency_decode_step.png")


def plot_prefill(runs: list[dict], out_dir: str) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        points = sorted(run["prefill"], key=lambda p: p["prompt_len"])
        ax.plot([p["prompt_len"] for p in points], [p["time_ms"] for p in points], marker="o", label=latency_label(run))
    _log2_axis(ax, [p["prompt_len"] for r in runs for p in r["prefill"]])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("ms to the first token (median)")
    ax.set_title("Prefill time, one prompt on an idle engine")
    ax.grid(alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    return _save(fig, out_dir, "latency_prefill.png")


def plot_phases(run: dict, out_dir: str) -> str:
    points = [p for p in run["decode"] if "skipped" not in p]
    fig, ax = plt.subplots(figsize=(max(7, 0.6 * len(points) + 3), 4.5))
    bottoms = [0.0] * len(points)
    xs = range(len(points))
    for phase in PHASES:
        heights = [max(0.0, p["phases_ms"][phase]) for p in points]
        ax.bar(xs, heights, bottom=bottoms, label=phase)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_xticks(list(xs), [f"{p['batch_size']}\n{p['context_len']}" for p in points], fontsize=8)
    ax.set_xlabel("batch size / context length")
    ax.set_ylabel("ms per decode step (mean)")
    ax.set_title(f"Where a decode step's time goes: {latency_label(run)}")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out_dir, f"latency_phases_{_slug(latency_label(run))}.png")


def plot_server_layers(run: dict, out_dir: str) -> str:
    server = run["server"]
    layers = list(server["layers"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = (("median_ttft_ms", "median TTFT (ms)"), ("median_tpot_ms", "median TPOT (ms)"),
              ("output_throughput", "output tokens/s"))
    width = 0.38
    for ax, (key, title) in zip(axes, panels):
        for j, mode in enumerate(("sequential", "concurrent")):
            values = [server["layers"][layer][mode][key] or 0.0 for layer in layers]
            ax.bar([i + (j - 0.5) * width for i in range(len(layers))], values, width, label=mode)
        ax.set_xticks(range(len(layers)), layers)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{server['num_requests']} requests, {server['input_len']} in / {server['output_len']} out: "
                 f"engine vs async front vs HTTP ({latency_label(run)})", fontsize=10)
    return _save(fig, out_dir, f"latency_server_{_slug(latency_label(run))}.png")


def plot_all(paths: list[str], out_dir: str) -> list[str]:
    serve, latency = load(paths)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    by_rate = [r for r in serve if r.get("max_concurrency") is None]
    by_concurrency = [r for r in serve if r.get("max_concurrency") is not None]
    if by_rate:
        written.append(plot_latency_vs_rate(by_rate, out_dir))
    if by_concurrency:
        written.append(plot_throughput_vs_concurrency(by_concurrency, out_dir))
    if any(p for r in latency for p in r["decode"] if "skipped" not in p):
        written.append(plot_decode_steps(latency, out_dir))
        written += [plot_phases(r, out_dir) for r in latency if any("skipped" not in p for p in r["decode"])]
    if any(r["prefill"] for r in latency):
        written.append(plot_prefill([r for r in latency if r["prefill"]], out_dir))
    written += [plot_server_layers(r, out_dir) for r in latency if r.get("server")]
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="JSON files from serve_bench.py --result-json / latency.py --out")
    p.add_argument("--out-dir", default="perf/plots")
    args = p.parse_args(argv)
    try:
        written = plot_all(args.results, args.out_dir)
    except ValueError as exc:
        p.error(str(exc))
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
