"""Emulate _nibble_pairs' PTX (prmt / lop3 / add.rn / mul.rn on 16-bit pairs) bit for bit in numpy and compare
with what it should compute: (q_p - zero) * scale rounded once to x's type (bf16: the scale rounded to bf16 first)."""
import numpy as np, torch
rng = np.random.default_rng(0)

def prmt(a, b, sel):
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    d = np.zeros_like(a)
    for i in range(4):
        s = (sel >> (4 * i)) & 0xF
        assert s < 8
        d |= src[s] << (8 * i)
    return d

def halves(v):
    return (v & 0xFFFF).astype(np.uint16), ((v >> 16) & 0xFFFF).astype(np.uint16)

def to_float(h, bf16):
    t = torch.from_numpy(h.astype(np.int16))
    return (t.view(torch.bfloat16) if bf16 else t.view(torch.float16)).double()

def round_double(x, bits):  # round-to-nearest-even of float64 values to `bits` significant bits (normal range)
    x = np.asarray(x, dtype=np.float64)
    m, e = np.frexp(x)
    return np.ldexp(np.round(m * 2.0 ** bits), e - bits)

def from_float(x, bf16):  # x exact in double -> RN to the 16-bit type, rounded once, directly from double
    x = x.numpy() if isinstance(x, torch.Tensor) else x
    r = round_double(x, 8 if bf16 else 11)
    t = torch.from_numpy(r).to(torch.bfloat16 if bf16 else torch.float16)  # exact: already representable
    assert (t.double().numpy() == r).all() or not bf16
    return t.view(torch.int16).numpy().astype(np.uint16).astype(np.uint32)

def op2(a, b, bf16, f):
    (al, ah), (bl, bh) = halves(a), halves(b)
    lo = from_float(f(to_float(al, bf16), to_float(bl, bf16)), bf16)
    hi = from_float(f(to_float(ah, bf16), to_float(bh, bf16)), bf16)
    return lo | (hi << 16)

def fma2(a, b, c, bf16):  # a * b + c per half, rounded once
    (al, ah), (bl, bh), (cl, ch) = halves(a), halves(b), halves(c)
    lo = from_float(to_float(al, bf16) * to_float(bl, bf16) + to_float(cl, bf16), bf16)
    hi = from_float(to_float(ah, bf16) * to_float(bh, bf16) + to_float(ch, bf16), bf16)
    return lo | (hi << 16)

def asm(words, neg_zero_pairs, hi_pairs, lo_pairs, magic, bf16, scaled=True):
    """The PTX of _NIBBLE_PAIRS_* / _NIBBLE_DIFFS_*, instruction by instruction."""
    u = words >> 4
    ts = [prmt(words, u, sel) for sel in (0x4400, 0x5511, 0x6622, 0x7733)]
    ts = [(t & 0x000F000F) | (magic * 0x10001) for t in ts]
    ts = [op2(t, neg_zero_pairs, bf16, lambda x, y: x + y) for t in ts]
    if scaled and bf16:
        ts = [fma2(t, hi_pairs, op2(t, lo_pairs, bf16, lambda x, y: x * y), bf16) for t in ts]
    elif scaled:
        ts = [op2(t, hi_pairs, bf16, lambda x, y: x * y) for t in ts]
    return [h for t in ts for h in halves(t)]  # 8 x uint16: nibble p = 2j (low half), 2j + 1 (high half)

n = 200000
words = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).astype(np.int64)
zeros = rng.integers(0, 17, n)  # 0..16 (v1's zero - 1 + 1 reaches 16)
scales16 = (rng.random(n) * 0.02 + 1e-3).astype(np.float16)
scales16[:10] = np.float16(65504); scales16[10:20] = np.float16(6e-8)  # extremes
for bf16 in (True, False):
    magic = 0x4300 if bf16 else 0x6400
    s32 = torch.from_numpy(scales16).float()
    s_hi = s32.to(torch.bfloat16 if bf16 else torch.float16)
    s_lo = (s32 - s_hi.float()).to(torch.bfloat16)
    assert (s_hi.double() + s_lo.double() == s32.double()).all() or not bf16  # the split is exact
    pairs = lambda t: ((t.view(torch.int16).numpy().astype(np.int64) & 0xFFFF) * 0x10001) & 0xFFFFFFFF
    nzp = ((zeros + (magic | 0x8000)) * 0x10001) & 0xFFFFFFFF
    for scaled in (True, False):
        got = asm(words, nzp, pairs(s_hi), pairs(s_lo), magic, bf16, scaled)
        for p in range(8):
            q = (words >> (4 * p)) & 0xF
            want = (q - zeros).astype(np.float64)  # the reference: fp32 (here exact double) product, rounded once
            if scaled:
                want = want * scales16.astype(np.float64)
            want_bits = from_float(want, bf16)
            bad = (got[p].astype(np.uint32) != want_bits).sum()
            assert bad == 0, (bf16, scaled, p, bad)
        print("bf16" if bf16 else "fp16", "scaled" if scaled else "q - zero", "bit-exact over", n, "words")
# the cheaper bf16 form (scale rounded to bf16, one packed multiply): how far from the reference
s = torch.from_numpy(scales16).double()
d = torch.from_numpy(((words & 0xF) - zeros).astype(np.float64))
ref = torch.from_numpy(round_double((d * s).numpy(), 8))
cheap = torch.from_numpy(round_double((d * torch.from_numpy(round_double(s.numpy(), 8))).numpy(), 8))
rel = ((cheap - ref).abs() / ref.abs().clamp(min=1e-30))[d != 0]
print("bf16, scale rounded to bf16 first: weights differing from the reference", round((cheap != ref).double().mean().item(), 4),
      "max relative difference", rel.max().item())
