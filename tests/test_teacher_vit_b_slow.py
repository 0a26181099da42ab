"""The paper-size teacher (SAM ViT-B) loads official-shaped weights at the paper's 128^3 crop, and trains on a CPU.

The training step runs on a 64^3 crop: every block attends within windows, so a step costs what its tokens cost, and
at 128^3 (8x the tokens) the one step took 236 s of CI's ~15 minutes (2-core Xeon, AVX-512 + AMX) while checking
nothing the 64^3 step does not: the same blocks, windows, adapters and gradient checkpointing, with the weights loaded
into every block the same way.
"""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import ImageEncoderViT

from teacher import count_parameters, load_sam_state_dict
from teacher.build import teacher_from_config


def official_vit_b_state_dict() -> dict:
    """A state dict with the keys and shapes of sam_vit_b_01ec64.pth's image encoder (random values)."""
    torch.manual_seed(0)
    encoder = ImageEncoderViT(
        depth=12, embed_dim=768, img_size=1024, mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=12, patch_size=16, qkv_bias=True, use_rel_pos=True, global_attn_indexes=(2, 5, 8, 11),
        window_size=14, out_chans=256,
    )
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if "rel_pos" in name or name == "pos_embed":  # zero-initialised in SAM: give them values
                p.normal_(0, 0.02)
    return {f"image_encoder.{k}": v for k, v in encoder.state_dict().items()}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_vit_b_teacher_loads_at_a_128_cube_and_trains_one_step_with_gradient_checkpointing():
    torch.set_num_threads(2)
    state = official_vit_b_state_dict()
    assert state["image_encoder.blocks.0.attn.rel_pos_h"].shape == (27, 64)
    assert state["image_encoder.blocks.2.attn.rel_pos_h"].shape == (127, 64)
    # Paper size: every SAM block lands in the 3D encoder, and the frozen part is SAM ViT-B's.
    paper = teacher_from_config({"preset": "vit_b", "roi_size": [128, 128, 128], "grad_checkpointing": True}, 3)
    report = load_sam_state_dict(state, paper)
    assert len(report.loaded) == 3 + 12 * 14 and report.ignored  # the 2D neck is the only thing left out
    assert 88.0e6 < count_parameters(paper)["frozen"] < 89.5e6
    del paper

    model = teacher_from_config({"preset": "vit_b", "roi_size": [64, 64, 64], "grad_checkpointing": True}, 3)
    report = load_sam_state_dict(state, model)
    del state
    assert len(report.loaded) == 3 + 12 * 14 and report.ignored
    assert 88.0e6 < count_parameters(model)["frozen"] < 89.5e6

    torch.manual_seed(0)
    image = torch.rand(1, 1, 64, 64, 64)
    label = torch.randint(0, 3, (1, 64, 64, 64))
    clicks = (torch.tensor([[[32.0, 30.0, 35.0], [5.0, 50.0, 15.0]]]), torch.tensor([[1, 0]]))
    logits = model(image, points=clicks)
    assert logits.shape == (1, 3, 64, 64, 64)
    loss = F.cross_entropy(logits, label)
    loss.backward()

    assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
        else:
            assert param.grad is None, name
