"""A teacher.pt made elsewhere must fit the run's data: labels (ids and names), class count, ROI and preprocessing.

``teacher.compat.check_teacher_fits`` is the one comparison; the pipeline's teacher and cache stages and online
distillation (``distill.train``) call it. Only a preprocessing mismatch can be let through
(``teacher.allow_preprocess_mismatch``), with a warning.
"""
import copy
import warnings

import pytest
import torch

from teacher.compat import TeacherMismatchError, TeacherPreprocessWarning, check_teacher_fits

LABELS = {0: "background", 1: "liver", 2: "spleen", 3: "aorta"}
SPEC = {"spacing_mm": [4.0, 4.0, 4.0], "orientation": "RAS",
        "intensity": {"mode": "scale", "hu_min": -175.0, "hu_max": 250.0, "mean": None, "std": None}}
ROI = [32, 32, 32]


def meta(labels=LABELS, preprocess=SPEC, roi=ROI, num_classes=None):
    return {"labels": dict(labels), "num_classes": max(labels) + 1 if num_classes is None else num_classes,
            "preprocess": copy.deepcopy(preprocess), "roi_size": list(roi)}


def test_a_matching_teacher_is_accepted_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_teacher_fits(meta(), LABELS, SPEC, ROI, source="t.pt") == []
    # Ids stored as strings and tuples for lists (a checkpoint written by other code) still match.
    other = meta(num_classes=4)
    other["labels"], other["roi_size"] = {str(k): v for k, v in LABELS.items()}, tuple(ROI)
    other["preprocess"]["spacing_mm"] = (4, 4, 4)
    assert check_teacher_fits(other, LABELS, SPEC, ROI) == []


def test_labels_in_another_order_are_refused_naming_both_and_cannot_be_overridden():
    swapped = {0: "background", 1: "spleen", 2: "liver", 3: "aorta"}
    for allow in (False, True):
        with pytest.raises(TeacherMismatchError) as err:
            check_teacher_fits(meta(labels=swapped), LABELS, SPEC, ROI, allow_preprocess_mismatch=allow,
                               source="/w/teacher.pt")
        text = str(err.value)
        assert "/w/teacher.pt" in text
        assert "labels[1]: teacher 'spleen', run (data.labels) 'liver'" in text
        assert "labels[2]: teacher 'liver', run (data.labels) 'spleen'" in text
        assert "another order" in text and "no setting overrides" in text


def test_other_class_names_count_or_no_labels_are_refused():
    with pytest.raises(TeacherMismatchError, match=r"labels\[3\]: teacher 'kidney', run \(data.labels\) 'aorta'"):
        check_teacher_fits(meta(labels={**LABELS, 3: "kidney"}), LABELS, SPEC, ROI)
    with pytest.raises(TeacherMismatchError, match=r"labels\[4\]: teacher 'kidney', run \(data.labels\) <missing>"):
        check_teacher_fits(meta(labels={**LABELS, 4: "kidney"}), LABELS, SPEC, ROI, allow_preprocess_mismatch=True)
    with pytest.raises(TeacherMismatchError, match=r"num_classes: teacher 9, run \(data.labels\) 4"):
        check_teacher_fits(meta(num_classes=9), LABELS, SPEC, ROI, allow_preprocess_mismatch=True)
    no_labels = meta()
    del no_labels["labels"]
    with pytest.raises(TeacherMismatchError, match="labels: teacher <missing>"):
        check_teacher_fits(no_labels, LABELS, SPEC, ROI)


def test_another_spacing_is_refused_and_allowed_with_the_override_with_a_warning():
    finer = copy.deepcopy(SPEC)
    finer["spacing_mm"] = [1.5, 1.5, 1.5]
    with pytest.raises(TeacherMismatchError) as err:
        check_teacher_fits(meta(preprocess=finer), LABELS, SPEC, ROI, source="/w/teacher.pt")
    text = str(err.value)
    assert "/w/teacher.pt" in text
    assert "preprocess.spacing_mm: teacher [1.5, 1.5, 1.5], run (data.preprocess) [4.0, 4.0, 4.0]" in text
    assert "teacher.allow_preprocess_mismatch=true" in text

    with pytest.warns(TeacherPreprocessWarning, match=r"/w/teacher.pt.*\n.*preprocess.spacing_mm: teacher \[1.5"):
        allowed = check_teacher_fits(meta(preprocess=finer), LABELS, SPEC, ROI, allow_preprocess_mismatch=True,
                                     source="/w/teacher.pt")
    assert allowed == ["preprocess.spacing_mm: teacher [1.5, 1.5, 1.5], run (data.preprocess) [4.0, 4.0, 4.0]"]


def test_intensity_window_statistics_and_orientation_are_compared():
    zscore = {"spacing_mm": [4.0, 4.0, 4.0], "orientation": "RAS",
              "intensity": {"mode": "zscore", "hu_min": -1000.0, "hu_max": 1500.0, "mean": 52.0, "std": 40.0}}
    other = copy.deepcopy(zscore)
    other["intensity"]["mean"], other["orientation"] = 60.0, "LPS"
    with pytest.raises(TeacherMismatchError) as err:
        check_teacher_fits(meta(preprocess=other), LABELS, zscore, ROI)
    assert "preprocess.intensity.mean: teacher 60.0, run (data.preprocess) 52.0" in str(err.value)
    assert "preprocess.orientation: teacher 'LPS', run (data.preprocess) 'RAS'" in str(err.value)
    with pytest.raises(TeacherMismatchError, match="preprocess.intensity.hu_max: teacher 250.0, run .* 1500.0"):
        check_teacher_fits(meta(), LABELS, {**zscore, "intensity": {**SPEC["intensity"], "hu_max": 1500.0}}, ROI)
    no_spec = meta()
    del no_spec["preprocess"]
    with pytest.raises(TeacherMismatchError, match=r"preprocess.\(spec\): teacher <missing>"):
        check_teacher_fits(no_spec, LABELS, SPEC, ROI)
    # Rounding noise of a statistic read back from JSON is not a mismatch.
    close = copy.deepcopy(zscore)
    close["intensity"]["std"] = 40.0 * (1 + 1e-9)
    assert check_teacher_fits(meta(preprocess=close), LABELS, zscore, ROI) == []


def test_another_roi_is_refused_even_with_the_override():
    for allow in (False, True):
        with pytest.raises(TeacherMismatchError, match=r"roi_size: teacher \[48, 48, 48\], run \(teacher.roi_size\) "
                                                       r"\[32, 32, 32\] \(set teacher.roi_size=\[48, 48, 48\]"):
            check_teacher_fits(meta(roi=[48, 48, 48]), LABELS, SPEC, ROI, allow_preprocess_mismatch=allow, source="t.pt")
    assert check_teacher_fits(meta(roi=[48, 48, 48]), LABELS, SPEC, None) == []  # None: not compared


def test_the_override_must_be_a_boolean():
    with pytest.raises(ValueError, match="teacher.allow_preprocess_mismatch must be true or false, got 'false'"):
        check_teacher_fits(meta(), LABELS, SPEC, ROI, allow_preprocess_mismatch="false")


def test_the_override_is_a_known_config_key_off_by_default():
    from configs import ConfigError, load_config

    for preset in ("demo", "btcv", "sam_med3d", "sam_med3d_demo"):
        cfg = load_config(preset)
        assert cfg["teacher"]["allow_preprocess_mismatch"] is False, preset
    assert load_config("demo", ["teacher.allow_preprocess_mismatch=true"])["teacher"]["allow_preprocess_mismatch"] is True
    with pytest.raises(ConfigError, match="allow_preproces_mismatch"):
        load_config("demo", ["teacher.allow_preproces_mismatch=true"])


# -- where a teacher.pt enters: the pipeline's teacher and cache stages, online distillation -----------------------

def _overrides(phantom_dataset):
    return [f"data.source={phantom_dataset}", "data.site.source=null", "preprocess.spacing_mm=[6.0, 6.0, 6.0]", "run.device=cpu",
            "teacher.roi_size=[32, 32, 32]", "student.names=[unet_small]", "student.roi_size=[64, 32, 32]"]


def write_teacher(path, labels, spacing=(6.0, 6.0, 6.0), roi=(32, 32, 32)):
    """A tiny untrained teacher.pt in the docs/interfaces.md format, with the given labels, spacing and ROI."""
    from configs import load_config
    from data.stats import preprocess_spec
    from teacher.build import build_teacher
    from teacher.checkpoint import save_teacher

    cfg = load_config("demo", [f"teacher.roi_size={list(roi)}", f"preprocess.spacing_mm={list(spacing)}"])
    torch.manual_seed(0)
    model = build_teacher(cfg["teacher"], max(labels) + 1)
    save_teacher(path, model, {"labels": dict(labels), "preprocess": preprocess_spec(cfg["preprocess"]), "step": 0,
                               "best_dice": 0.0, "config": cfg})
    return path


@pytest.fixture(scope="module")
def pipeline(phantom_dataset, tmp_path_factory):
    from configs import load_config
    from pipeline import Pipeline

    run_dir = tmp_path_factory.mktemp("compat_run")
    pipe = Pipeline(load_config("demo", _overrides(phantom_dataset)), out_dir=run_dir, log=lambda line: None)
    pipe.stage_data()
    return pipe


def _given(pipe, path, allow=False, log=None):
    pipe.cfg["teacher"]["checkpoint_file"] = str(path)
    pipe.cfg["teacher"]["allow_preprocess_mismatch"] = allow
    pipe.log = log or (lambda line: None)
    return pipe.stage_teacher()


def test_the_pipeline_refuses_a_given_teacher_whose_labels_are_in_another_order(pipeline, tmp_path):
    from pipeline import PipelineError

    labels = dict(pipeline.data.labels)
    swapped = {**labels, 1: labels[2], 2: labels[1]}
    bad = write_teacher(tmp_path / "swapped.pt", swapped)
    for allow in (False, True):
        with pytest.raises(PipelineError) as err:
            _given(pipeline, bad, allow=allow)
        text = str(err.value)
        assert str(bad) in text
        assert f"labels[1]: teacher {labels[2]!r}, run (data.labels) {labels[1]!r}" in text
    # The matching teacher is accepted, and the cache stage would check it again (it is the same function).
    good = write_teacher(tmp_path / "good.pt", labels)
    assert _given(pipeline, good) == good.resolve()


def test_the_pipeline_refuses_another_spacing_or_roi_and_allows_the_spacing_with_the_override(pipeline, tmp_path):
    from pipeline import PipelineError

    labels = dict(pipeline.data.labels)
    finer = write_teacher(tmp_path / "finer.pt", labels, spacing=(4.0, 4.0, 4.0))
    with pytest.raises(PipelineError, match=r"preprocess.spacing_mm: teacher \[4.0, 4.0, 4.0\], run \(data.preprocess\) "
                                            r"\[6.0, 6.0, 6.0\]"):
        _given(pipeline, finer)
    lines = []
    with pytest.warns(TeacherPreprocessWarning):
        assert _given(pipeline, finer, allow=True, log=lines.append) == finer.resolve()
    assert any("WARNING" in line and "spacing_mm" in line for line in lines)
    # Up to date on the next run, it still says so.
    lines.clear()
    assert _given(pipeline, finer, allow=True, log=lines.append) == finer.resolve()
    assert any("up to date" in line for line in lines) and any("WARNING" in line and "spacing_mm" in line for line in lines)

    wider = write_teacher(tmp_path / "wider.pt", labels, roi=(64, 64, 32))
    with pytest.raises(PipelineError, match=r"roi_size: teacher \[64, 64, 32\], run \(teacher.roi_size\) \[32, 32, 32\]"):
        _given(pipeline, wider, allow=True)


def test_online_distillation_refuses_a_teacher_that_does_not_fit(pipeline, tmp_path):
    from distill.train import train_student

    labels = dict(pipeline.data.labels)
    swapped = write_teacher(tmp_path / "swapped.pt", {**labels, 1: labels[2], 2: labels[1]})
    cfg = copy.deepcopy(pipeline.cfg)
    cfg["distill"].update(mode="online", steps=1, val_every=1, batch_size=1, warmup_steps=0)
    with pytest.raises(TeacherMismatchError, match=r"labels\[1\]"):
        train_student(cfg, pipeline.run_dir, "unet_small", 0.5, teacher_ckpt=swapped, data=pipeline.data,
                      out_dir=tmp_path / "student", progress=False)
