"""`teacher.backbone` selects the teacher by name; both backbones save and load through teacher.pt."""
import pytest
import torch

from teacher import TeacherConfigError, build_teacher, load_teacher, save_teacher


def test_sam_med3d_backbone_builds_by_name_and_round_trips_through_teacher_pt(tmp_path):
    torch.manual_seed(0)
    cfg = {"backbone": "sam_med3d", "preset": "tiny", "peft": "lora", "lora_rank": 2, "roi_size": [32, 32, 32]}
    model = build_teacher(cfg, num_classes=3).eval()
    image = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        expected = model(image)
    assert expected.shape == (1, 3, 32, 32, 32)
    path = save_teacher(tmp_path / "teacher.pt", model, {"labels": {0: "background", 1: "a", 2: "b"}})
    loaded, meta = load_teacher(path)
    assert meta["teacher_cfg"]["backbone"] == "sam_med3d" and meta["roi_size"] == [32, 32, 32]
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), expected)


def test_unknown_backbone_is_refused_with_its_name():
    with pytest.raises(TeacherConfigError, match="sam3"):
        build_teacher({"backbone": "sam3", "preset": "tiny"}, num_classes=3)
