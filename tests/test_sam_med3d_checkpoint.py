"""SAM-Med3D checkpoints: our state dict has the published layout and loads strictly; mismatches are named."""
import argparse

import numpy as np
import pytest
import torch

from teacher.sam_med3d import CheckpointMismatchError, build_sam_med3d, load_sam_med3d_checkpoint


@pytest.fixture
def tiny_state():
    torch.manual_seed(0)
    return build_sam_med3d(preset="tiny").state_dict()


def _save(obj, path):
    torch.save(obj, path)
    return path


def test_training_snapshot_loads_strictly_and_reproduces_outputs(tmp_path, tiny_state):
    # Published files are training snapshots: weights under model_state_dict next to other entries.
    path = _save({"model_state_dict": tiny_state, "epoch": 3, "args": argparse.Namespace(lr=8e-4), "dices": [np.float64(0.8)]}, tmp_path / "sam_med3d.pth")
    torch.manual_seed(1)
    fresh = build_sam_med3d(path, preset="tiny")
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, tiny_state[key]), key

    reference = build_sam_med3d(preset="tiny")
    reference.load_state_dict(tiny_state)
    image = torch.randn(1, 1, 32, 32, 32)
    clicks = (torch.tensor([[[10.0, 12.0, 9.0]]]), torch.tensor([[1]]))
    with torch.no_grad():
        assert torch.equal(fresh(image, clicks)[0], reference(image, clicks)[0])


def test_bare_state_dict_with_ddp_prefix_loads(tmp_path, tiny_state):
    path = _save({f"module.{k}": v for k, v in tiny_state.items()}, tmp_path / "bare.pth")
    model = load_sam_med3d_checkpoint(path, build_sam_med3d(preset="tiny"))
    assert torch.equal(model.state_dict()["mask_decoder.iou_token.weight"], tiny_state["mask_decoder.iou_token.weight"])


def test_missing_key_is_refused_and_named(tmp_path, tiny_state):
    del tiny_state["image_encoder.blocks.1.attn.rel_pos_h"]
    path = _save({"model_state_dict": tiny_state}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \[image_encoder\.blocks\.1\.attn\.rel_pos_h\]"):
        build_sam_med3d(path, preset="tiny")


def test_misshapen_and_unexpected_keys_are_refused_with_shapes(tmp_path, tiny_state):
    tiny_state["mask_decoder.mask_tokens.weight"] = torch.zeros(5, 48)
    tiny_state["image_encoder.extra_head.weight"] = torch.zeros(1)
    path = _save({"model_state_dict": tiny_state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        load_sam_med3d_checkpoint(path, build_sam_med3d(preset="tiny"))
    msg = str(err.value)
    assert "mask_decoder.mask_tokens.weight: checkpoint (5, 48) vs model (4, 48)" in msg
    assert "unexpected keys [image_encoder.extra_head.weight]" in msg
    assert str(path) in msg


def test_a_file_without_weights_is_refused(tmp_path):
    path = _save({"epoch": 1}, tmp_path / "no_weights.pth")
    with pytest.raises(CheckpointMismatchError, match="not a SAM-Med3D checkpoint"):
        build_sam_med3d(path, preset="tiny")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_sam_med3d(tmp_path / "nowhere.pth", preset="tiny")


def test_vit_b_has_the_published_size_and_layout():
    # Meta tensors: shapes without allocating or initialising 100M parameters.
    with torch.device("meta"):
        sam = build_sam_med3d(preset="vit_b_ori")
    n_params = sum(p.numel() for p in sam.parameters())
    assert n_params == 100_509_232  # SAM-Med3D reports 100.5M parameters
    shapes = {k: tuple(v.shape) for k, v in sam.state_dict().items()}
    assert len(shapes) == 324
    assert shapes["image_encoder.patch_embed.proj.weight"] == (768, 1, 16, 16, 16)
    assert shapes["image_encoder.pos_embed"] == (1, 8, 8, 8, 768)
    assert shapes["image_encoder.blocks.0.attn.rel_pos_d"] == (27, 64)  # window 14: 2*14-1
    assert shapes["image_encoder.blocks.2.attn.rel_pos_d"] == (15, 64)  # global on 8³: 2*8-1
    assert shapes["image_encoder.neck.2.weight"] == (384, 384, 3, 3, 3)
    assert shapes["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] == (3, 128)
    assert shapes["prompt_encoder.mask_downscaling.6.weight"] == (384, 16, 1, 1, 1)
    assert shapes["mask_decoder.output_upscaling.0.weight"] == (384, 96, 2, 2, 2)
    assert shapes["mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"] == (192, 384)
    assert shapes["mask_decoder.output_hypernetworks_mlps.3.layers.2.weight"] == (48, 384)
    assert shapes["mask_decoder.iou_prediction_head.layers.0.weight"] == (256, 384)
