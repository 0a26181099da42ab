"""SAM-Med3D modules on tiny configurations: prompt/decoder shapes, windowed attention, the click adapter,
the automatic K-class teacher and its config hook, preprocessing."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs import load_config
from teacher.sam_med3d import (
    SamMed3DAutoTeacher,
    SamMed3DClickSegmenter,
    SamMed3DConfigError,
    SamMed3DTeacher,
    build_sam_med3d,
    build_sam_med3d_teacher,
    crop_or_pad,
    paste_window,
    sam_med3d_preprocess_spec,
    upsample_logits,
    zscore_foreground,
)
from teacher.sam_med3d.image_encoder import Attention3D

torch.set_num_threads(2)


@pytest.fixture
def tiny_sam():
    torch.manual_seed(0)
    return build_sam_med3d(preset="tiny")


def test_prompt_encoder_and_decoder_shapes(tiny_sam):
    pe = tiny_sam.prompt_encoder  # tiny: 32³ crop, 4³ tokens, width 48, low-res masks 16³
    coords = torch.tensor([[[3.0, 4.0, 5.0], [20.0, 9.0, 1.0]]] * 2)
    labels = torch.tensor([[1, 0], [1, -1]])
    sparse, dense = pe((coords, labels))
    assert sparse.shape == (2, 3, 48)  # N clicks + one padding token
    assert torch.equal(sparse[1, 1], pe.not_a_point_embed.weight[0])  # label -1 is "not a point"
    assert dense.shape == (2, 48, 4, 4, 4)
    _, dense_mask = pe((coords, labels), torch.randn(2, 1, 16, 16, 16))
    assert dense_mask.shape == (2, 48, 4, 4, 4) and not torch.allclose(dense_mask, dense)
    assert pe.get_dense_pe().shape == (1, 48, 4, 4, 4)
    with pytest.raises(ValueError, match="mask prompt"):
        pe((coords, labels), torch.randn(2, 1, 8, 8, 8))

    emb = torch.randn(2, 48, 4, 4, 4)
    low, iou = tiny_sam.mask_decoder(emb, pe.get_dense_pe(), sparse, dense)
    assert low.shape == (2, 1, 16, 16, 16) and iou.shape == (2, 1)
    low3, iou3 = tiny_sam.mask_decoder(emb, pe.get_dense_pe(), sparse, dense, multimask_output=True)
    assert low3.shape == (2, 3, 16, 16, 16) and iou3.shape == (2, 3)
    with pytest.raises(ValueError, match="128"):
        build_sam_med3d(preset="vit_b_ori", depth=1).image_encoder(torch.zeros(1, 1, 64, 64, 64))


def _reference_window_attention(attn: Attention3D, x: torch.Tensor) -> torch.Tensor:
    """SAM-Med3D's windowed attention written out naively: zero-pad the normalised tokens to whole
    windows, attend within each full window (padded queries included), crop."""
    b, gx, gy, gz, c = x.shape
    ws, h = attn.window_size, attn.num_heads
    p = [math.ceil(s / ws) * ws for s in (gx, gy, gz)]
    xp = F.pad(x, (0, 0, 0, p[2] - gz, 0, p[1] - gy, 0, p[0] - gx))
    n = [s // ws for s in p]
    win = xp.reshape(b, n[0], ws, n[1], ws, n[2], ws, c).permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, ws**3, c)
    q, k, v = attn.qkv(win).reshape(win.shape[0], ws**3, 3, h, -1).permute(2, 0, 3, 1, 4)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    idx = torch.arange(ws)
    rel = idx[:, None] - idx[None, :] + ws - 1
    rd, rh, rw = attn.rel_pos_d[rel], attn.rel_pos_h[rel], attn.rel_pos_w[rel]
    for i in range(ws**3):
        di, hi, wi = i // ws**2, (i // ws) % ws, i % ws
        for j in range(ws**3):
            dj, hj, wj = j // ws**2, (j // ws) % ws, j % ws
            qi = q[:, :, i]
            logits[:, :, i, j] += (qi * rd[di, dj]).sum(-1) + (qi * rh[hi, hj]).sum(-1) + (qi * rw[wi, wj]).sum(-1)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(-1, ws**3, c)
    out = out.reshape(b, n[0], n[1], n[2], ws, ws, ws, c).permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, *p, c)
    return attn.proj(out[:, :gx, :gy, :gz])


@pytest.mark.parametrize("grid, window", [((3, 3, 3), 4), ((5, 4, 3), 3)])
def test_windowed_attention_matches_the_padded_reference(grid, window):
    # (3³ in one 4³ window) is the published case (8³ tokens in one 14³ window), computed for real
    # queries only; (5,4,3) with window 3 exercises several windows with padding.
    torch.manual_seed(0)
    attn = Attention3D(16, num_heads=2, rel_pos_size=window, window_size=window)
    for table in (attn.rel_pos_d, attn.rel_pos_h, attn.rel_pos_w):
        torch.nn.init.normal_(table, std=0.5)
    x = torch.randn(2, *grid, 16)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), _reference_window_attention(attn, x), rtol=1e-4, atol=1e-5)


def test_click_segmenter_runs_an_iterative_two_click_protocol(tiny_sam):
    teacher = SamMed3DTeacher(tiny_sam)
    segment_fn = SamMed3DClickSegmenter(teacher)
    rng = np.random.default_rng(0)
    image = rng.normal(size=(40, 36, 30)).astype(np.float32)  # larger than the 32³ crop on two axes
    target = np.zeros(image.shape, bool)
    target[10:22, 12:24, 8:18] = True

    coords = np.array([[15, 17, 12]])
    labels = np.array([1])
    first = segment_fn(image, coords, labels)
    assert first.shape == image.shape and first.dtype == bool
    error = first ^ target
    second_click = np.argwhere(error)[0]
    coords = np.vstack([coords, second_click])
    labels = np.array([1, int(target[tuple(second_click)])])
    second = segment_fn(image, coords, labels)
    assert second.shape == image.shape

    # The second call fed back the first call's low-res logits as the mask prompt, with both clicks.
    window, origin = crop_or_pad(image, (32, 32, 32), center=coords[0])
    with torch.no_grad():
        emb = tiny_sam.image_encoder(torch.from_numpy(window)[None, None])
        local = torch.from_numpy((coords - np.array(origin)).astype(np.float32))[None]
        lab = torch.from_numpy(labels)[None]
        low1 = teacher.low_res_logits(emb, (local[:, :1], lab[:, :1]))
        low2 = teacher.low_res_logits(emb, (local, lab), low1)
        full = F.interpolate(low2, size=(32, 32, 32), mode="trilinear", align_corners=False)[0, 0] > 0
    np.testing.assert_array_equal(second, paste_window(full.numpy(), origin, image.shape, fill=False))
    # Outside the 32³ window around the first click (X 0..31 here) nothing is segmented.
    assert origin[0] == 0 and not second[32:].any()

    with pytest.raises(ValueError, match="image"):
        segment_fn(np.zeros((4, 4)), coords, labels)


def test_interactive_teacher_forward_returns_full_resolution_logits(tiny_sam):
    teacher = SamMed3DTeacher(tiny_sam)
    image = torch.randn(2, 1, 32, 32, 32)
    clicks = (torch.tensor([[[5.0, 6.0, 7.0]], [[20.0, 20.0, 20.0]]]), torch.tensor([[1], [1]]))
    with torch.no_grad():
        logits = teacher(image, clicks)
        again = teacher(image, clicks, prev_mask_logits=logits)  # full-res feedback is resized to 16³
    assert logits.shape == again.shape == (2, 1, 32, 32, 32)
    assert torch.isfinite(again).all() and not torch.allclose(logits, again)


def test_auto_teacher_k_classes_and_peft_freezing(tiny_sam):
    image = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        emb_before = tiny_sam.image_encoder(image)
    teacher = SamMed3DAutoTeacher(tiny_sam, num_classes=3, peft="lora", lora_rank=2, freeze_encoder=True)
    low = teacher.forward_low_res(image)
    assert low.shape == (2, 3, 16, 16, 16)
    logits = teacher(image)
    assert logits.shape == (2, 3, 32, 32, 32)
    torch.testing.assert_close(logits, upsample_logits(low.half(), (32, 32, 32)), rtol=1e-2, atol=1e-2)
    with torch.no_grad():  # LoRA starts at zero: the frozen encoder computes what it did before
        torch.testing.assert_close(teacher.sam.image_encoder(image), emb_before)

    trainable = {n for n, p in teacher.named_parameters() if p.requires_grad}
    encoder_trainable = {n for n in trainable if n.startswith("sam.image_encoder")}
    assert encoder_trainable and all(".lora." in n for n in encoder_trainable)
    assert not any(n.startswith("sam.prompt_encoder") for n in trainable)
    assert {"class_tokens.weight", "auto_prompt.out.weight", "sam.mask_decoder.mask_tokens.weight"} <= trainable
    logits.pow(2).mean().backward()
    for name, p in teacher.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name

    with pytest.raises(ValueError, match="peft"):
        SamMed3DAutoTeacher(build_sam_med3d(preset="tiny"), 3, peft="adapter")


def test_config_hook_builds_the_teacher_from_sam_med3d_yaml():
    cfg = load_config("sam_med3d", ["teacher.preset=tiny", "teacher.roi_size=[32,32,32]", "teacher.lora_rank=2"])
    assert cfg["teacher"]["backbone"] == "sam_med3d" and cfg["preprocess"]["spacing_mm"] == [1.5, 1.5, 1.5]
    teacher = build_sam_med3d_teacher(cfg["teacher"], num_classes=4, checkpoint=None)
    # No checkpoint: random weights carry nothing, so the whole encoder trains and no LoRA is added.
    assert all(p.requires_grad for p in teacher.sam.image_encoder.parameters())
    with torch.no_grad():
        assert teacher(torch.randn(1, 1, 32, 32, 32)).shape == (1, 4, 32, 32, 32)
    vit_b = load_config("sam_med3d")["teacher"]
    assert vit_b["roi_size"] == [128, 128, 128] and vit_b["preset"] == "vit_b_ori"
    with pytest.raises(SamMed3DConfigError, match="roi_size"):
        build_sam_med3d_teacher({**cfg["teacher"], "roi_size": [64, 64, 64]}, 4)


def test_preprocess_zscore_over_foreground_and_window_round_trip():
    spec = sam_med3d_preprocess_spec()
    assert spec["spacing_mm"] == [1.5, 1.5, 1.5] and spec["intensity"]["stats"] == "per_volume_foreground"
    rng = np.random.default_rng(0)
    ct = np.full((20, 20, 20), -1000.0)
    ct[5:15, 5:15, 5:15] = rng.normal(60, 20, size=(10, 10, 10)).clip(1, None)
    z = zscore_foreground(ct)
    fg = z[ct > 0]
    assert abs(fg.mean()) < 1e-4 and abs(fg.std() - 1) < 1e-4 and (z[ct <= 0] < -10).all()
    with pytest.raises(ValueError, match="no voxel above 0"):
        zscore_foreground(np.full((4, 4, 4), -5.0))

    vol = rng.normal(size=(50, 20, 33)).astype(np.float32)
    win, origin = crop_or_pad(vol, (32, 32, 32), center=(45, 10, 16))
    assert win.shape == (32, 32, 32) and origin == (18, -6, 0)  # shifted inside on X, padded on Y
    back = paste_window(win, origin, vol.shape)
    np.testing.assert_array_equal(back[18:, :, :32], vol[18:, :, :32])
    assert (back[:18] == 0).all() and (back[:, :, 32] == 0).all()


def test_click_segmenter_plugs_into_the_evaluation_click_protocol(tiny_sam):
    from evaluation.clicks import click_protocol

    from evaluation.metrics import mask_metrics

    segmenter = SamMed3DClickSegmenter(SamMed3DTeacher(tiny_sam))
    masks = []

    def segment_fn(image, coords, labels):  # the segmenter, keeping each mask it answers
        masks.append(np.asarray(segmenter(image, coords, labels)).astype(bool))
        return masks[-1]

    image = torch.randn(1, 32, 32, 32)
    gt = np.zeros((32, 32, 32), bool)
    gt[8:20, 10:22, 6:16] = True
    result = click_protocol(segment_fn, image, gt, spacing_mm=(1.5, 1.5, 1.5), n_clicks=(1, 2))
    assert set(result["dice"]) == {1, 2}
    # An untrained model has no accuracy to floor: the scores are those of the masks it answered, recomputed here.
    assert len(masks) == 2  # the first mask was not perfect: a second click was placed
    for n, mask in zip((1, 2), masks):
        expected = mask_metrics(mask, gt, (1.5, 1.5, 1.5), 2.0, hd95=False)
        assert result["dice"][n] == pytest.approx(expected["dice"])
        assert result["nsd"][n] == pytest.approx(expected["nsd"])
    assert result["dice_auc"] == pytest.approx((result["dice"][1] + result["dice"][2]) / 2)
    assert gt[tuple(result["clicks"][0][0])]  # the protocol's first click is on the target
