"""Students: the registry builds the named MONAI networks, describe() counts their cost, checkpoints round-trip."""
import pytest
import torch

from student import (StudentCheckpointError, UnknownStudentError, build_student, check_roi, describe, load_student,
                     save_student)

SPEC = {"spacing_mm": [4.0, 4.0, 4.0], "orientation": "RAS",
        "intensity": {"mode": "scale", "hu_min": -175.0, "hu_max": 250.0, "mean": None, "std": None}}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.mark.parametrize("name,roi", [("swinunetr_tiny", (64, 32, 32)), ("unet_small", (32, 32, 32)),
                                      ("basic_unet", (32, 32, 32))])
def test_students_map_an_roi_to_per_class_logits(name, roi):
    check_roi(name, roi)
    model = build_student(name, num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 1, *roi))
    assert out.shape == (1, 3, *roi)


def test_unknown_student_and_bad_sizes_are_refused_with_the_name():
    with pytest.raises(UnknownStudentError, match="swinunetr_huge"):
        build_student("swinunetr_huge", 3)
    with pytest.raises(ValueError, match="num_classes"):
        build_student("swinunetr_tiny", 1)
    with pytest.raises(ValueError, match="multiples of 32"):
        check_roi("swinunetr_tiny", [64, 64, 48])
    with pytest.raises(ValueError, match="bottleneck"):
        check_roi("swinunetr_tiny", [32, 32, 32])
    check_roi("swinunetr_tiny", [64, 64, 32])


def test_swinunetr_tiny_and_small_keep_their_sizes():
    tiny = describe(build_student("swinunetr_tiny", 14), [64, 32, 32])
    small = describe(build_student("swinunetr_small", 14), [64, 32, 32])
    # Counted with MONAI 1.6.1, 14 classes: tiny (feature_size 12, student/registry.py) 4,078,220 parameters,
    # small (24) 15,703,304; the bounds catch a MONAI or registry change that alters the networks.
    assert 4.0e6 < tiny["params"] < 4.2e6
    assert 15.5e6 < small["params"] < 15.9e6
    # Twice the width costs about four times the FLOPs.
    assert 3.0 < small["gflops"] / tiny["gflops"] < 4.5


@pytest.mark.slow
def test_swinunetr_tiny_costs_about_45_gflop_per_96_cube_patch():
    stats = describe(build_student("swinunetr_tiny", 14), [96, 96, 96])
    assert stats["gflops"] == pytest.approx(44.8, rel=0.02)


def test_checkpoint_round_trip_restores_weights_and_meta(tmp_path):
    torch.manual_seed(0)
    model = build_student("unet_small", 4).eval()
    meta = {"arch": {"name": "unet_small", "num_classes": 4, "in_channels": 1}, "roi_size": [32, 32, 32],
            "preprocess": SPEC, "labels": {0: "background", 1: "liver", 2: "spleen", 3: "kidney"}, "step": 7,
            "best_dice": 0.5, "lambda_kd": 0.3, "config": {"seed": 0}}
    path = save_student(tmp_path / "student.pt", model, meta)
    loaded, loaded_meta = load_student(path)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))
    assert loaded_meta["arch"]["name"] == "unet_small" and loaded_meta["step"] == 7
    assert loaded_meta["labels"][2] == "spleen" and loaded_meta["lambda_kd"] == 0.3
    assert "model" not in loaded_meta
    assert not loaded.training


def test_a_file_that_is_not_a_student_checkpoint_is_refused_naming_it(tmp_path):
    other = tmp_path / "teacher.pt"
    torch.save({"model": {}, "teacher_cfg": {}}, other)
    with pytest.raises(StudentCheckpointError, match="teacher.pt.*not a student checkpoint"):
        load_student(other)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(StudentCheckpointError, match="notes.pt"):
        load_student(text)
    with pytest.raises(StudentCheckpointError, match="missing.pt"):
        load_student(tmp_path / "missing.pt")
    with pytest.raises(StudentCheckpointError, match="lacks"):
        save_student(tmp_path / "x.pt", build_student("unet_small", 2), {"arch": {"name": "unet_small", "num_classes": 2}})


def test_architecture_options_are_recorded_and_rebuilt_exactly(tmp_path):
    """student.arch (e.g. 4³ attention windows) goes into student.pt; load_student rebuilds that network."""
    from student import arch_options

    assert arch_options("swinunetr_tiny") == {"window_size": 7, "use_v2": False}
    assert arch_options("unet_small", {"window_size": 4}) == {}  # one student.arch section serves every student
    with pytest.raises(ValueError, match="unknown option.*windowsize"):
        arch_options("swinunetr_tiny", {"windowsize": 4})
    with pytest.raises(ValueError, match="window_size must be a positive integer"):
        build_student("swinunetr_tiny", 3, options={"window_size": 0})

    torch.manual_seed(0)
    options = arch_options("swinunetr_tiny", {"window_size": 4})
    model = build_student("swinunetr_tiny", 3, options=options).eval()
    assert tuple(model.swinViT.window_size) == (4, 4, 4)
    path = save_student(tmp_path / "student.pt", model, {
        "arch": {"name": "swinunetr_tiny", "num_classes": 3, "options": options},
        "roi_size": [64, 32, 32], "preprocess": SPEC, "labels": {0: "background", 1: "a", 2: "b"}})
    loaded, meta = load_student(path)
    assert meta["arch"]["options"] == {"window_size": 4, "use_v2": False}
    assert tuple(loaded.swinViT.window_size) == (4, 4, 4)
    x = torch.randn(1, 1, 64, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    # The option is structural: a default (7³) network cannot even take these weights, so a checkpoint that
    # did not record it could not be rebuilt.
    with pytest.raises(RuntimeError, match="relative_position_bias_table"):
        build_student("swinunetr_tiny", 3).load_state_dict(model.state_dict())
