"""The sampler's device time a step: the sorting-free torch path against the fused Triton kernel.

    python perf/sampler_bench.py [--rows 1 64 256] [--vocab 151936 128256]

`engine.sampler.sample` on float32 logits of the given shape, every row at temperature 0.6 (as the
`nano` and `fixed` workloads), timed with `triton.testing.do_bench` (median, L2 flushed between
runs), once with the fused kernel and once without it (FUSED_SAMPLING_DEVICES emptied). Both draws
are exact samples of the same distribution; only their random streams differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere, no install needed

from engine import sampler  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--vocab", type=int, nargs="+", default=[151_936, 128_256])
    args = parser.parse_args()
    print(f"{'rows':>6} {'vocab':>8} {'torch ms':>9} {'fused ms':>9} {'speed-up':>9}")
    for vocab in args.vocab:
        for rows in args.rows:
            logits = torch.randn(rows, vocab, device="cuda")
            params = [SamplingParams(temperature=0.6, ignore_eos=True)] * rows
            batch = sampler.SamplingBatch(params=params, generators=[None] * rows, token_ids=[[1]] * rows,
                                          num_prompt_tokens=[1] * rows, eos_token_ids={0})
            times = {}
            for name, devices in (("torch", ()), ("fused", ("cuda",))):
                sampler.FUSED_SAMPLING_DEVICES = devices
                times[name] = triton.testing.do_bench(lambda: sampler.sample(logits, batch, max_logprobs=0))
            print(f"{rows:>6} {vocab:>8} {times['torch']:>9.3f} {times['fused']:>9.3f} {times['torch'] / times['fused']:>8.1f}x")


if __name__ == "__main__":
    main()
