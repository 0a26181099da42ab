"""The teacher end to end: shapes from the input (no fixed grid), prompt modes, presets, config errors."""
import warnings

import pytest
import torch

from teacher import PRESETS, TeacherConfigError, build_teacher, count_parameters
from teacher.build import teacher_from_config
from teacher.model import PEFTConfigError

torch.set_num_threads(2)

# Small on purpose (CI has 2 cores): 16^3 crops -> 4^3 tokens; other sizes below exercise windows and padding.
CFG = {"preset": "tiny", "roi_size": [16, 16, 16], "arch": {"embed_dim": 32, "num_heads": 2}}


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return teacher_from_config(CFG, num_classes=4).eval()


def test_same_model_runs_at_two_crop_sizes(teacher):
    with torch.no_grad():
        for size in [(16, 16, 16), (48, 40, 24)]:  # 4^3 tokens (one small window), 12x10x6 (padded, shifted windows)
            logits = teacher(torch.randn(1, 1, *size))
            assert logits.shape == (1, 4, *size)
            assert torch.isfinite(logits).all()


def test_auto_points_and_both_prompt_modes(teacher):
    torch.manual_seed(1)
    image = torch.randn(2, 1, 16, 16, 16)
    coords = torch.tensor([[[2.0, 3.0, 4.0], [10.0, 6.0, 15.0]], [[8.0, 8.0, 8.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[1, 0], [1, -1]])
    with torch.no_grad():
        auto = teacher(image)
        points = teacher(image, points=(coords, labels), use_auto_prompt=False)
        both = teacher(image, points=(coords, labels))
        plain = teacher(image, use_auto_prompt=False)
        moved = teacher(image, points=(coords + 4.0 * (coords < 10), labels))
    for out in (auto, points, both, plain):
        assert out.shape == (2, 4, 16, 16, 16)
    assert not torch.allclose(both, auto, atol=1e-4)  # points change the output
    assert not torch.allclose(points, plain, atol=1e-4)
    assert not torch.allclose(auto, plain, atol=1e-4)  # so does the auto prompt
    assert not torch.allclose(moved[0], both[0], atol=1e-4)  # where the clicks are matters


def test_padding_clicks_change_nothing(teacher):
    image = torch.randn(1, 1, 16, 16, 16)
    one_click = (torch.tensor([[[10.0, 11.0, 12.0]]]), torch.tensor([[1]]))
    padded = (torch.tensor([[[10.0, 11.0, 12.0], [3.0, 14.0, 9.0]]]), torch.tensor([[1, -1]]))
    with torch.no_grad():
        torch.testing.assert_close(teacher(image, points=one_click), teacher(image, points=padded))


def test_bad_points_are_refused_with_a_clear_error(teacher):
    image = torch.zeros(1, 1, 16, 16, 16)
    with pytest.raises(ValueError, match="B x N x 3"):
        teacher(image, points=(torch.zeros(1, 2, 2), torch.ones(1, 2)))
    with pytest.raises(ValueError, match="1 \\(positive\\), 0 \\(negative\\) or -1"):
        teacher(image, points=(torch.zeros(1, 2, 3), torch.tensor([[1, 2]])))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    image = torch.randn(1, 1, 32, 32, 16)  # 8x8x4 tokens: shifted windows along x and y
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = teacher_from_config({**CFG, "grad_checkpointing": checkpointing}, num_classes=3)
        assert model.grad_checkpointing is checkpointing
        model(image).square().mean().backward()
        grads.append(model.image_encoder.blocks[0].adapter.linear1.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_tiny_preset_default_crop_and_parameter_count():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_teacher({"preset": "tiny", "roi_size": [64, 64, 48]}, num_classes=8)
    counts = count_parameters(model)
    assert counts["frozen"] == 0 and 2.0e6 < counts["trainable"] < 2.6e6
    assert model.image_encoder.depth_embed.shape == (1, 12, 128)  # 48 / 4 slices of tokens
    assert model.prompt_generator.levels == 2  # 16 x 16 x 12 tokens: two halvings keep >= 2 per axis


def test_vit_b_preset_shapes_without_computing():
    with torch.device("meta"):
        model = teacher_from_config({"preset": "vit_b", "roi_size": [128, 128, 128]}, num_classes=14)
    enc = model.image_encoder
    assert enc.pos_embed.shape == (1, 64, 64, 768) and enc.depth_embed.shape == (1, 32, 768)
    assert enc.patch_embed.proj.weight.shape == (768, 3, 16, 16)
    assert enc.patch_embed.slice_merge.weight.shape == (768, 1, 1, 1, 16)
    assert enc.blocks[0].attn.rel_pos_h.shape == (15, 64) and enc.blocks[0].adapter.linear1.weight.shape == (384, 768)
    assert len(enc.blocks) == 12 and enc.neck_indexes == (2, 5, 8, 11)
    assert model.prompt_generator.levels == 4
    assert model.point_prompt.global_queries.shape == (1, 10, 256)
    logits = model(torch.empty(1, 1, 128, 128, 128, device="meta"))
    assert logits.shape == (1, 14, 128, 128, 128)
    model.configure_trainable(pretrained=True)
    counts = count_parameters(model)
    # SAM ViT-B without its 2D neck and with norms trainable.
    assert 88.0e6 < counts["frozen"] < 89.5e6


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"preset": "vit_xl"}, "teacher.preset"),
        ({"preset": "tiny", "peft": "prefix"}, "teacher.peft"),
        ({"preset": "tiny", "prompt_mode": "boxes"}, "teacher.prompt_mode"),
        ({"preset": "tiny", "peft": "lora", "lora_rank": 0}, "teacher.lora_rank"),
        ({"preset": "tiny", "roi_size": [64, 64, 42]}, "roi_size"),
        ({"preset": "tiny", "arch": {"width": 3}}, "teacher.arch.width"),
    ],
)
def test_config_errors_name_the_key(cfg, match):
    with pytest.raises(ValueError, match=match):
        teacher_from_config(cfg, num_classes=3)


def test_presets_follow_sam_sizes():
    assert [(PRESETS[p].embed_dim, PRESETS[p].depth, PRESETS[p].num_heads) for p in ("vit_b", "vit_l", "vit_h")] == [
        (768, 12, 12), (1024, 24, 16), (1280, 32, 16)]
    assert PRESETS["vit_l"].neck_indexes == (5, 11, 17, 23)
