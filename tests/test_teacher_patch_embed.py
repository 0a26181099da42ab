"""The folded 3D patch embedding equals the reference path (x4 trilinear upsampling, SAM's 2D 16x16 patch conv
on every axial slice, depthwise merge of 16 slices), borders included."""
import pytest
import torch
import torch.nn.functional as F

from teacher.patch_embed import PatchEmbed3d, upsample_weights


@pytest.mark.parametrize("size", [(8, 12, 16), (4, 4, 4), (12, 8, 20)])
def test_folded_conv_equals_upsample_embed_merge(size):
    torch.manual_seed(0)
    embed = PatchEmbed3d(embed_dim=8).double()
    volume = torch.randn(2, 1, *size, dtype=torch.float64)

    tokens = embed(volume)
    reference = embed.reference_forward(volume)

    assert tokens.shape == (2, size[0] // 4, size[1] // 4, size[2] // 4, 8)
    torch.testing.assert_close(tokens, reference, rtol=1e-10, atol=1e-10)


def test_reference_path_is_the_interpolation_the_reference_code_uses():
    # One interior row of U reproduces F.interpolate(..., scale_factor=4, mode="linear", align_corners=False).
    signal = torch.randn(10, dtype=torch.float64)
    up = F.interpolate(signal[None, None], scale_factor=4, mode="linear", align_corners=False)[0, 0]
    u = upsample_weights(16, 4)  # 16 x 6
    padded = F.pad(signal[None, None], (1, 1), mode="replicate")[0, 0]
    for patch in range(10 // 4):
        window = padded[4 * patch : 4 * patch + 6]
        torch.testing.assert_close(u @ window, up[16 * patch : 16 * patch + 16])


def test_gradients_reach_the_trainable_slice_merge_in_float32():
    torch.manual_seed(0)
    embed = PatchEmbed3d(embed_dim=8)
    embed.proj.requires_grad_(False)  # SAM's patch conv is frozen under PEFT
    volume = torch.randn(1, 1, 8, 8, 8)
    torch.testing.assert_close(embed(volume), embed.reference_forward(volume), rtol=1e-4, atol=1e-4)
    embed(volume).square().mean().backward()
    assert embed.slice_merge.weight.grad is not None and embed.slice_merge.weight.grad.abs().sum() > 0
    assert embed.proj.weight.grad is None


def test_sizes_that_are_not_multiples_of_four_are_refused():
    embed = PatchEmbed3d(embed_dim=8)
    with pytest.raises(ValueError, match="multiples of 4"):
        embed(torch.zeros(1, 1, 8, 8, 6))
    with pytest.raises(ValueError, match="B x 1 x X x Y x Z"):
        embed(torch.zeros(1, 2, 8, 8, 8))
