"""One-pass sampling on the GPU: temperature + a random draw + argmax, fused into one read of the logits.

`engine.sampler` draws a token as argmax(probs / Exponential(1)) (gpt-fast's trick), which over
a [rows, vocab] float32 tensor costs about eleven passes (divide by the temperature, softmax, the
noise, the division, two argmaxes): at 256 rows of Qwen3's 151,936-token vocabulary, 156 MB a pass
and ~0.6 ms a step of the H100's time (the `window` profile), for a decode step of ~10 ms.

The same draw, written the Gumbel-max way: argmax(logits / T + G) with G = -log(-log(U)) and U
uniform, is an exact sample from softmax(logits / T) (argmax(log p - log E), E = -log U ~ Exp(1)),
and needs no normalisation: each program reads its share of a row's logits once (a row is split
over a few programs so that small batches fill the GPU too), keeps a running (max, index) per lane
and reduces them; two small torch ops pick each row's winner among its splits. U comes from
Triton's Philox generator keyed by the row's seed and the token's index (one call gives four tokens
theirs), so a row's draw depends on its seed alone, never on the other rows of the batch or on how its vocabulary was split. A temperature of 0 is greedy: the plain argmax, first index on ties (as
torch.argmax). Logits of -inf (logit_bias, blocked stop tokens) are never drawn.

No host sync; not used inside CUDA graphs (sampling runs after the graph, on the real rows).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

_BLOCK = 1024  # vocabulary entries a loop step
_NUM_WARPS = 4
_TARGET_PROGRAMS = 1024  # rows x vocabulary splits: ~8 programs an H100 SM, so the reads overlap
# lg2.approx (one MUFU op) for the noise's outer log instead of libdevice's exact log2 polynomial
# (sm_90 offline: both logs exact, ~120 instructions a logit). The Triton interpreter has no libdevice.
_FAST_LOG = os.environ.get("TRITON_INTERPRET", "0") != "1"


@triton.jit
def _log2(x, FAST_LOG: tl.constexpr):
    if FAST_LOG:
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


@triton.jit
def _take_quarter(row_ptr, first, lanes, hi, u, sampled, inv_temperature, best, best_index, FAST_LOG: tl.constexpr):
    """Columns first + lanes: their scores, and each lane's running best (score, first index) with them."""
    cols = first + lanes
    x = tl.load(row_ptr + cols, mask=cols < hi, other=float("-inf")).to(tl.float32)
    # Gumbel noise -ln(E), E = -ln u ~ Exp(1); u = 0 gives -inf: never chosen. The inner log is
    # the exact one: near u = 1 (u reaches 1 - 2^-24) E is ~1e-7, below lg2.approx's absolute
    # error (2^-22), which could return 0 there (noise +inf: a random token wins). The outer
    # log's argument is never near 1 in a way that matters (an error of 2^-22 in the noise).
    exponential = -0.6931471805599453 * tl.log2(u)
    gumbel = -0.6931471805599453 * _log2(exponential, FAST_LOG)
    # greedy rows take x itself (x * 1 + gumbel * 0 would be NaN where gumbel is -inf)
    score = tl.where(sampled, x * inv_temperature + gumbel, x)
    score = tl.where(score != score, float("inf"), score)  # NaN wins, as in torch.argmax
    better = score > best  # strict: each lane keeps its first index of its maximum
    return tl.where(better, score, best), tl.where(better, cols, best_index)


@triton.jit(do_not_specialize=["num_splits"])  # it changes with the rows: one compile, not one a row count
def _gumbel_argmax_kernel(logits_ptr, stride_row, temperature_ptr, seed_ptr, part_value_ptr, part_index_ptr,
                          vocab, chunk, num_splits, BLOCK: tl.constexpr, FAST_LOG: tl.constexpr):
    """Program (row, split): the best score and its first index over vocabulary[split * chunk:][:chunk]."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    temperature = tl.load(temperature_ptr + row)
    seed = tl.load(seed_ptr + row)
    sampled = temperature > 0
    inv_temperature = 1.0 / tl.where(sampled, temperature, 1.0)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, vocab)
    # Each loop step takes BLOCK columns as four quarters; lane i of quarter k holds column
    # start + k * QUARTER + i. One Philox call keyed by start / 4 + i gives lane i its four uniforms,
    # one a quarter: a quarter of the calls of one draw a column (Philox was most of the kernel's
    # instructions, and the kernel is bound by them: 147 us for 256 rows x 151,936, H100). The key
    # still depends on the global column alone (start is a multiple of BLOCK in every split).
    QUARTER: tl.constexpr = BLOCK // 4
    lanes = tl.arange(0, QUARTER)
    best = tl.full([QUARTER], float("-inf"), tl.float32)
    best_index = tl.zeros([QUARTER], tl.int32) + lo
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    for start in range(lo, hi, BLOCK):
        u0, u1, u2, u3 = tl.rand4x(seed, start // 4 + lanes)
        # quarters in column order, so that within a lane a later column wins only if strictly better
        best, best_index = _take_quarter(row_ptr, start, lanes, hi, u0, sampled, inv_temperature, best, best_index, FAST_LOG)
        best, best_index = _take_quarter(row_ptr, start + QUARTER, lanes, hi, u1, sampled, inv_temperature, best,
                                         best_index, FAST_LOG)
        best, best_index = _take_quarter(row_ptr, start + 2 * QUARTER, lanes, hi, u2, sampled, inv_temperature, best,
                                         best_index, FAST_LOG)
        best, best_index = _take_quarter(row_ptr, start + 3 * QUARTER, lanes, hi, u3, sampled, inv_temperature, best,
                                         best_index, FAST_LOG)
    top = tl.max(best, axis=0)
    # the smallest index among lanes holding the maximum (torch.argmax's first index); in a split
    # of -inf every lane still holds the split's first index
    index = tl.min(tl.where(best == top, best_index, vocab), axis=0)
    tl.store(part_value_ptr + row * num_splits + split, top)
    tl.store(part_index_ptr + row * num_splits + split, index.to(tl.int64))


def gumbel_argmax(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """logits [N, V], temperature [N] float32 (0: greedy), seeds [N] int64 -> sampled token ids [N]
    int64 (into `out` if given). Each row's vocabulary is split over a few programs so that a small
    batch still spreads over the GPU; the splits' winners are reduced by two small torch ops (the
    first split wins ties, so the first index overall does)."""
    num_rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    blocks = triton.cdiv(vocab, _BLOCK)
    chunk = triton.cdiv(blocks, min(blocks, max(1, _TARGET_PROGRAMS // max(num_rows, 1)))) * _BLOCK
    num_splits = triton.cdiv(vocab, chunk)
    part_value = torch.empty(num_rows, num_splits, dtype=torch.float32, device=logits.device)
    part_index = torch.empty(num_rows, num_splits, dtype=torch.long, device=logits.device)
    if num_rows:
        _gumbel_argmax_kernel[(num_rows, num_splits)](
            logits, logits.stride(0), temperature, seeds, part_value, part_index, vocab, chunk, num_splits,
            BLOCK=_BLOCK, FAST_LOG=_FAST_LOG, num_warps=_NUM_WARPS,
        )
    tokens = part_index.gather(1, part_value.argmax(dim=1, keepdim=True)).squeeze(1)
    return tokens if out is None else out.copy_(tokens)
