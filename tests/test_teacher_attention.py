"""Windowed 3D attention (shifted windows, padding, decomposed 3-axis relative position) against a brute-force
dense attention in which every token sees exactly the tokens of its (shifted) window."""
import itertools

import pytest
import torch

from teacher.attention import WindowAttention3d, attention_mask, decomposed_rel_pos_bias, rel_pos_augmented_qk, window_layout


def segment(coord: int, size: int, window: int, shift: int) -> int:
    """Which window a coordinate belongs to in the original (unrolled) grid."""
    if shift == 0:
        return coord // window
    return -1 if coord < shift else (coord - shift) // window


def dense_reference(attn: WindowAttention3d, x: torch.Tensor) -> torch.Tensor:
    """Full attention over the grid with an explicit window mask and explicit relative-position bias."""
    b, gx, gy, gz, c = x.shape
    window, shift, _ = window_layout((gx, gy, gz), attn.window_size, attn.shifted)
    coords = list(itertools.product(range(gx), range(gy), range(gz)))
    seg = torch.tensor([[segment(p[a], (gx, gy, gz)[a], window[a], shift[a]) for a in range(3)] for p in coords])
    allowed = (seg[:, None, :] == seg[None, :, :]).all(-1)
    pos = torch.tensor(coords)
    # Index into the (2w-1)-long tables; pairs farther apart than a window are masked, so clamping is harmless.
    rel = (pos[:, None, :] - pos[None, :, :] + attn.window_size - 1).clamp(0, 2 * attn.window_size - 2)
    tables = (attn.rel_pos_h, attn.rel_pos_w, attn.rel_pos_d)
    heads = attn.num_heads
    q, k, v = attn.qkv(x.reshape(b, -1, c)).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    logits = q @ k.transpose(-1, -2) * (c // heads) ** -0.5
    for axis, table in enumerate(tables):
        logits = logits + torch.einsum("bhnd,nmd->bhnm", q, table[rel[..., axis]])
    logits = logits.masked_fill(~allowed, float("-inf"))
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, -1, c)
    return attn.proj(out).reshape(b, gx, gy, gz, c)


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("grid", [(8, 8, 8), (8, 4, 6), (12, 8, 2)])
def test_window_attention_equals_dense_attention_with_window_mask(grid, shifted):
    torch.manual_seed(0)
    attn = WindowAttention3d(dim=16, num_heads=2, window_size=4, shifted=shifted).double()
    for table in (attn.rel_pos_h, attn.rel_pos_w, attn.rel_pos_d):
        torch.nn.init.normal_(table)  # distinct tables, so a swapped axis would fail
    x = torch.randn(2, *grid, 16, dtype=torch.float64)
    torch.testing.assert_close(attn(x), dense_reference(attn, x), rtol=1e-9, atol=1e-9)


def test_shifted_window_mask_separates_the_wrapped_regions():
    grid = (16, 16, 16)
    window, shift, padded = window_layout(grid, 8, shifted=True)
    assert window == (8, 8, 8) and shift == (4, 4, 4) and padded == grid
    mask = attention_mask(grid, window, shift, padded)
    assert mask.shape == (8, 512, 512)
    # Window 0 holds original tokens 4..11 on every axis: one region, nothing masked.
    assert (mask[0] == 0).all()
    # The last window holds original 12..15 and 0..3 on every axis: 2^3 regions of 64 tokens each.
    allowed_per_query = (mask[-1] == 0).sum(-1)
    assert (allowed_per_query == 64).all()
    assert window_layout(grid, 8, shifted=False)[1] == (0, 0, 0)
    assert attention_mask(grid, (8, 8, 8), (0, 0, 0), grid) is None


def test_padding_keys_are_masked_and_short_axes_shrink_the_window():
    window, shift, padded = window_layout((16, 16, 12), 8, shifted=False)
    assert window == (8, 8, 8) and padded == (16, 16, 16)
    mask = attention_mask((16, 16, 12), window, shift, padded)
    # Second window along z holds 4 real and 4 padded z-slices: half its keys are masked.
    assert ((mask[1] == 0).sum(-1) == 256).all()
    assert window_layout((4, 16, 16), 8, shifted=True) == ((4, 8, 8), (0, 4, 4), (4, 16, 16))


def test_rel_pos_folded_into_qk_equals_explicit_bias():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 4 * 2 * 3, 8, dtype=torch.float64), torch.randn(2, 3, 24, 8, dtype=torch.float64)
    tables = tuple(torch.randn(7, 8, dtype=torch.float64) for _ in range(3))
    q_aug, k_aug = rel_pos_augmented_qk(q, k, tables, (4, 2, 3))
    expected = q @ k.transpose(-1, -2) / 8**0.5 + decomposed_rel_pos_bias(q, tables, (4, 2, 3))
    torch.testing.assert_close(q_aug @ k_aug.transpose(-1, -2), expected)
