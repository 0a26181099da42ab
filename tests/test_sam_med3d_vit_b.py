"""The published SAM-Med3D ViT-B size end to end on a CPU (slow: ~1 min on 2 cores)."""
import pytest
import torch

from teacher.sam_med3d import SamMed3DAutoTeacher, build_sam_med3d


@pytest.mark.slow
def test_vit_b_forward_and_backward_on_a_128_crop():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    # freeze_encoder as when the published weights are loaded: LoRA + decoder + APG train.
    teacher = SamMed3DAutoTeacher(build_sam_med3d(preset="vit_b_ori"), num_classes=2, lora_rank=4)
    image = torch.randn(1, 1, 128, 128, 128)
    low = teacher.forward_low_res(image)
    assert low.shape == (1, 2, 32, 32, 32) and torch.isfinite(low).all()
    logits = torch.nn.functional.interpolate(low, size=(128, 128, 128), mode="trilinear", align_corners=False)
    target = torch.zeros(1, 128, 128, 128, dtype=torch.long)
    target[:, 40:90, 40:90, 40:90] = 1
    torch.nn.functional.cross_entropy(logits, target).backward()

    n_trainable = 0
    for name, p in teacher.named_parameters():
        if p.requires_grad:
            n_trainable += p.numel()
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    assert any(p.grad.abs().sum() > 0 for n, p in teacher.named_parameters() if ".lora.b_" in n)
    # LoRA (rank 4 on q, v of 12 blocks) + decoder + APG + class tokens: a small share of ~100M.
    assert n_trainable < 0.15 * sum(p.numel() for p in teacher.parameters())
