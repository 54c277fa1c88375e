"""The fused sampling kernel (`ops.triton_sampling`) and the sampler's path through it.

On CPU the kernel runs under the Triton interpreter on small cases (a fresh process: TRITON_INTERPRET
is read when a kernel is decorated); on the GPU (`pytest -m gpu`) at full size, against
torch.argmax for greedy rows and against softmax(logits / T) for sampled ones.
"""

from __future__ import annotations

import pytest
import torch

from tests.interpreter import run_under_the_interpreter

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def check_greedy_rows_are_torch_argmax(device: str, vocab: int, dtype: torch.dtype) -> None:
    from ops.triton_sampling import gumbel_argmax

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, vocab, generator=gen).to(dtype)
    logits[7, 5] = float("nan")  # torch.argmax answers a NaN's index
    logits[1, 5] = logits[1, vocab - 3] = 50  # a tie: the first index wins
    logits[2] = float("-inf")  # nothing drawable: index 0, as torch.argmax
    logits[3] = float("-inf")
    logits[3, vocab - 1] = 1  # the last (masked-tail) block
    logits[4, 0] = 80
    logits = logits.to(device)
    out = torch.full((8,), -1, dtype=torch.long, device=device)  # poisoned: every row must be written
    gumbel_argmax(logits, torch.zeros(8, device=device), torch.arange(8, device=device), out=out)
    assert out.tolist() == logits.float().argmax(dim=-1).tolist()


def check_sampled_rows_follow_softmax(device: str, rows: int, tolerance: float) -> None:
    from ops.triton_sampling import gumbel_argmax

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf"), 0.5, -3.0], device=device)
    vocab = logits.numel()
    for temperature in (0.6, 1.0, 1.7):
        seeds = torch.randint(0, 2**62, (rows,), generator=torch.Generator().manual_seed(1)).to(device)
        out = gumbel_argmax(logits.expand(rows, vocab).contiguous(), torch.full((rows,), temperature, device=device), seeds)
        freq = torch.bincount(out, minlength=vocab).double().cpu() / rows
        expected = (logits.double().cpu() / temperature).softmax(dim=-1)
        assert freq[4] == 0, "a -inf logit was drawn"
        assert (freq - expected).abs().max() < tolerance, (temperature, freq.tolist(), expected.tolist())


def check_a_row_depends_on_its_seed_only(device: str) -> None:
    from ops.triton_sampling import gumbel_argmax

    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 300, generator=gen).to(device)
    temps = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5, 1.0], device=device)
    seeds = torch.tensor([11, 12, 13, 14, 15, 16], device=device)
    together = gumbel_argmax(logits, temps, seeds)
    alone = torch.cat([gumbel_argmax(logits[i : i + 1], temps[i : i + 1], seeds[i : i + 1]) for i in range(6)])
    assert together.tolist() == alone.tolist()
    flat = torch.zeros(64, 300, device=device)  # uniform: other seeds give other draws
    draws = gumbel_argmax(flat, torch.ones(64, device=device), torch.arange(64, device=device))
    assert len(set(draws.tolist())) > 40


def check_the_sampler_takes_the_fused_path(device: str) -> None:
    """engine.sampler.sample on the fused path: greedy rows are argmax, seeded rows repeat whatever
    the batch, logit_bias reaches the kernel, and rows with top_p keep the sorting path."""
    from engine import sampler
    from engine.sampling_params import SamplingParams

    calls = []
    fused = sampler._sample_fused
    sampler._sample_fused = lambda logits, batch, temps: calls.append(len(batch.params)) or fused(logits, batch, temps)
    sampler.FUSED_SAMPLING_DEVICES = (torch.device(device).type,)
    try:
        gen = torch.Generator().manual_seed(3)
        logits = torch.randn(4, 500, generator=gen).to(device)

        def batch_of(params, seeds):
            gens = [None if s is None else torch.Generator(device).manual_seed(s) for s in seeds]
            return sampler.SamplingBatch(params=params, generators=gens, token_ids=[[1, 2]] * len(params),
                                         num_prompt_tokens=[2] * len(params), eos_token_ids={0})

        seeded = SamplingParams(temperature=0.9, seed=5)
        greedy = SamplingParams(temperature=0)
        biased = SamplingParams(temperature=1.0, logit_bias={7: 100.0})
        out = sampler.sample(logits, batch_of([greedy, seeded, biased, seeded], [None, 5, None, 5]), max_logprobs=5)
        assert calls == [4]
        ids = out.token_ids.tolist()
        assert ids[0] == logits[0].argmax().item()
        assert ids[2] == 7
        alone = sampler.sample(logits[1:2], batch_of([seeded], [5]), max_logprobs=5).token_ids.tolist()
        assert alone == [ids[1]]
        # A neighbour with top-p / top-k: the batch sorts first, and still draws in the kernel, so the
        # seeded row's draw is the same; a top_k=1 row can only give its argmax.
        top1 = SamplingParams(temperature=1.5, top_k=1)
        mixed = sampler.sample(logits[1:3], batch_of([seeded, top1], [5, None]), max_logprobs=5).token_ids.tolist()
        assert calls == [4, 1, 2] and mixed == [ids[1], logits[2].argmax().item()]
        nucleus = SamplingParams(temperature=1.0, top_p=0.5)
        assert sampler.sample(logits[1:3], batch_of([seeded, nucleus], [5, None]), max_logprobs=5).token_ids[0] == ids[1]
        # logits in the model's 16-bit dtype go to the kernel as they are: the same draws as widened
        half = logits.half()
        params = [greedy, seeded, SamplingParams(temperature=0.7, seed=9)]
        as_half = sampler.sample(half[:3], batch_of(params, [None, 5, 9]), max_logprobs=5).token_ids.tolist()
        as_float = sampler.sample(half[:3].float(), batch_of(params, [None, 5, 9]), max_logprobs=5).token_ids.tolist()
        assert as_half == as_float and calls == [4, 1, 2, 2, 3, 3]
    finally:
        sampler._sample_fused = fused
        sampler.FUSED_SAMPLING_DEVICES = ("cuda",)


_INTERPRETER_SCRIPT = """
import torch
import tests.test_triton_sampling as t
t.check_greedy_rows_are_torch_argmax("cpu", 3000, torch.float32)
t.check_greedy_rows_are_torch_argmax("cpu", 1024, torch.float16)
t.check_sampled_rows_follow_softmax("cpu", 300, 0.11)
t.check_a_row_depends_on_its_seed_only("cpu")
t.check_the_sampler_takes_the_fused_path("cpu")
print("ok")
"""


def test_fused_sampling_kernel_under_the_interpreter():
    run_under_the_interpreter(_INTERPRETER_SCRIPT)


@gpu
@needs_cuda
@pytest.mark.parametrize("vocab", [151_936, 128_256, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_rows_equal_torch_argmax_on_gpu(vocab, dtype):
    check_greedy_rows_are_torch_argmax("cuda", vocab, dtype)


@gpu
@needs_cuda
def test_a_dominant_token_is_always_drawn_at_full_vocabulary_size():
    """With one logit 40 above the rest, anything else has probability ~6e-13 a row. Noise computed
    with lg2.approx for log(u) near u = 1 would give some rows +inf noise on a random token
    (about vocab x 2^-24, ~1% of rows at this vocabulary)."""
    from ops.triton_sampling import gumbel_argmax

    rows, vocab = 4096, 151_936
    logits = torch.full((rows, vocab), -20.0, device="cuda")
    logits[:, 0] = 20.0
    seeds = torch.randint(0, 2**62, (rows,), device="cuda")
    out = gumbel_argmax(logits, torch.ones(rows, device="cuda"), seeds)
    assert (out == 0).all(), f"{int((out != 0).sum())} of {rows} rows drew another token"


@gpu
@needs_cuda
def test_sampled_rows_follow_softmax_on_gpu():
    check_sampled_rows_follow_softmax("cuda", 400_000, 0.004)
    check_a_row_depends_on_its_seed_only("cuda")
    check_the_sampler_takes_the_fused_path("cuda")


@gpu
@needs_cuda
def test_one_compiled_variant_serves_every_row_count():
    """The vocabulary's split over programs changes with the rows; were the kernel specialized on it,
    a row count first met mid-run would compile a variant there (~1 s with an empty cache). With a
    vocabulary of 16 blocks, 1, 100 and 1,024 rows make 16, 8 and 1 splits: all three of Triton's
    classes (divisible by 16, neither, == 1)."""
    from ops.triton_sampling import _gumbel_argmax_kernel, gumbel_argmax

    _gumbel_argmax_kernel.device_caches.clear()  # what earlier tests compiled must not hide a new variant
    counts = []
    for rows in (1, 100, 1024):
        logits = torch.randn(rows, 16 * 1024, device="cuda")
        out = gumbel_argmax(logits, torch.zeros(rows, device="cuda"), torch.arange(rows, device="cuda"))
        assert out.tolist() == logits.argmax(dim=-1).tolist()
        counts.append(sum(len(cache[0]) for cache in _gumbel_argmax_kernel.device_caches.values()))
    assert counts[1:] == counts[:1] * (len(counts) - 1), f"variants after each row count: {counts}"
