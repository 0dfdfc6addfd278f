"""The reference ops against independent brute-force versions written from the spec's prose, plus gradcheck."""

import itertools

import pytest
import torch
from _utils import gen

from rgt.ops import reference


def _band(i: int, n: int, w: int) -> int:
    """Row/column band of the Swin region labelling: [0, n-w), [n-w, n-w/2), [n-w/2, n)."""
    return 0 if i < n - w else (1 if i < n - w // 2 else 2)


def naive_rwin(qkv, table, H, W, split, shift, heads, scale):
    """Token-by-token L-SA: pad, (roll), find the window, gather keys, bias + mask, softmax. Slow and plain."""
    B, _, C3 = qkv.shape
    C, hb = C3 // 3, heads // 2
    half, P = C // 2, max(split)
    Hp, Wp = -(-H // P) * P, -(-W // P) * P
    grid = qkv.new_zeros(B, Hp, Wp, C3)
    grid[:, :H, :W] = qkv.view(B, H, W, C3)
    out = qkv.new_zeros(B, H, W, C)
    for i in range(2):
        hs, ws = split if i == 0 else split[::-1]
        sh, sw = (hs // 2, ws // 2) if shift else (0, 0)
        ch = slice(i * half, (i + 1) * half)
        for b, y0, x0 in itertools.product(range(B), range(H), range(W)):
            y, x = (y0 - sh) % Hp, (x0 - sw) % Wp  # position on the rolled map
            wy, wx = y // hs * hs, x // ws * ws
            keys = [(ky, kx) for ky in range(wy, wy + hs) for kx in range(wx, wx + ws)]
            src = [((ky + sh) % Hp, (kx + sw) % Wp) for ky, kx in keys]  # rolled -> padded image coordinates
            q = grid[b, (y + sh) % Hp, (x + sw) % Wp, :C][ch].view(hb, -1)
            k = torch.stack([grid[b, sy, sx, C:2 * C][ch] for sy, sx in src]).view(len(keys), hb, -1)
            v = torch.stack([grid[b, sy, sx, 2 * C:][ch] for sy, sx in src]).view(len(keys), hb, -1)
            rows = [(y - ky + hs - 1) * (2 * ws - 1) + (x - kx + ws - 1) for ky, kx in keys]
            logits = torch.einsum("hd,khd->hk", q * scale, k) + table[i][rows].T
            if shift:
                region = _band(y, Hp, hs) * 3 + _band(x, Wp, ws)
                other = torch.tensor([_band(ky, Hp, hs) * 3 + _band(kx, Wp, ws) != region for ky, kx in keys])
                logits = logits - 100.0 * other.to(logits.dtype)
            out[b, y0, x0, ch] = torch.einsum("hk,khd->hd", logits.softmax(-1), v).reshape(-1)
    return out.view(B, H * W, C)


CASES = [  # (H, W, split, shift, heads, C): padding on one or both sides, exact multiples, square windows
    (5, 6, (2, 4), False, 4, 8),
    (5, 6, (2, 4), True, 4, 8),
    (8, 8, (2, 4), True, 2, 4),
    (7, 12, (4, 4), True, 4, 16),
    (4, 9, (2, 4), True, 4, 8),
]


@pytest.mark.parametrize("H,W,split,shift,heads,C", CASES)
def test_rwin_attention_matches_brute_force(H, W, split, shift, heads, C):
    g = gen(f"rwin-{H}-{W}-{split}-{shift}-{heads}-{C}")
    qkv = torch.randn(2, H * W, 3 * C, generator=g, dtype=torch.float64)
    M = (2 * split[0] - 1) * (2 * split[1] - 1)
    table = torch.randn(2, M, heads // 2, generator=g, dtype=torch.float64)
    scale = (C // heads) ** -0.5
    got = reference.rwin_attention(qkv, table, H, W, split, shift, heads, scale)
    torch.testing.assert_close(got, naive_rwin(qkv, table, H, W, split, shift, heads, scale), rtol=1e-12, atol=1e-12)


def test_shift_mask_is_cached_and_typed():
    reference.shift_mask.cache_clear()
    a = reference.shift_mask(64, 96, 8, 32, torch.device("cpu"), torch.bfloat16)
    b = reference.shift_mask(64, 96, 8, 32, torch.device("cpu"), torch.bfloat16)
    assert a is b and a.dtype == torch.bfloat16 and a.shape == (8 * 3, 256, 256)
    assert reference.shift_mask.cache_info().misses == 1


def test_rgsa_and_dwconv_reference_semantics():
    g = gen("rgsa-dwconv")
    q, k, v = (torch.randn(2, 3, n, d, generator=g, dtype=torch.float64) for n, d in ((10, 5), (4, 5), (4, 7)))
    expected = torch.softmax(torch.einsum("bhnd,bhmd->bhnm", q, k) * 0.3, -1) @ v
    torch.testing.assert_close(reference.rgsa_attention(q, k, v, 0.3), expected, rtol=1e-13, atol=1e-13)
    x = torch.randn(1, 3, 37, 70, generator=g, dtype=torch.float64)
    w = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    y = reference.recursive_dwconv(x, w, None, 2)
    assert y.shape == (1, 3, 2, 4)
    level1 = torch.einsum("bchpwq,cpq->bchw", x[:, :, :36, :68].reshape(1, 3, 9, 4, 17, 4), w[:, 0])
    level2 = torch.einsum("bchpwq,cpq->bchw", level1[:, :, :8, :16].reshape(1, 3, 2, 4, 4, 4), w[:, 0])
    torch.testing.assert_close(y, level2, rtol=1e-12, atol=1e-12)


def test_reference_ops_gradcheck():
    g = gen("gradcheck")
    qkv = torch.randn(1, 20, 24, generator=g, dtype=torch.float64, requires_grad=True)
    table = torch.randn(2, 21, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, t: reference.rwin_attention(a, t, 4, 5, (2, 4), True, 4, 0.5), (qkv, table), fast_mode=True)
    q, k, v = (torch.randn(1, 2, n, 3, generator=g, dtype=torch.float64, requires_grad=True) for n in (6, 4, 4))
    assert torch.autograd.gradcheck(lambda a, b, c: reference.rgsa_attention(a, b, c, 0.7), (q, k, v), fast_mode=True)
    x = torch.randn(1, 2, 17, 18, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: reference.recursive_dwconv(*a, 2), (x, w, b), fast_mode=True)
