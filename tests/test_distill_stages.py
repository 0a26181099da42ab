"""Stage bookkeeping: skip when up to date, rerun when inputs change, keep a killed stage's files for resume."""
import json

import pytest

from distill.stages import run_stage


def writer(calls, text="v1"):
    def body(directory):
        calls.append(text)
        (directory / "partial.txt").write_text("progress")
        out = directory / "artifact.txt"
        out.write_text(text)
        return {"artifact": str(out)}, {"text": text}

    return body


def test_a_stage_runs_once_for_the_same_inputs(tmp_path):
    calls = []
    first = run_stage("demo", tmp_path / "s", {"a": 1}, writer(calls), log=lambda m: None)
    second = run_stage("demo", tmp_path / "s", {"a": 1}, writer(calls), log=lambda m: None)
    assert calls == ["v1"] and not first.skipped and second.skipped
    assert second.artifacts == first.artifacts and second.info == {"text": "v1"}
    manifest = json.loads((tmp_path / "s" / "stage.json").read_text())
    assert manifest["status"] == "done" and manifest["artifact_hashes"]["artifact"] == first.artifact_hashes["artifact"]


def test_changed_inputs_or_a_missing_artifact_rerun_the_stage(tmp_path):
    calls = []
    run_stage("demo", tmp_path / "s", {"a": 1}, writer(calls, "v1"), log=lambda m: None)
    (tmp_path / "s" / "stray.txt").write_text("from the old inputs")
    changed = run_stage("demo", tmp_path / "s", {"a": 2}, writer(calls, "v2"), log=lambda m: None)
    assert calls == ["v1", "v2"] and not changed.skipped
    assert not (tmp_path / "s" / "stray.txt").exists()  # the stale folder was cleared first
    (tmp_path / "s" / "artifact.txt").unlink()
    run_stage("demo", tmp_path / "s", {"a": 2}, writer(calls, "v2"), log=lambda m: None)
    assert calls == ["v1", "v2", "v2"]


def test_a_killed_stage_keeps_its_files_for_the_engine_to_resume(tmp_path):
    def killed(directory):
        (directory / "last.pt").write_text("step 10")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage("train", tmp_path / "s", {"a": 1}, killed, log=lambda m: None)
    assert json.loads((tmp_path / "s" / "stage.json").read_text())["status"] == "running"

    seen = []

    def resumed(directory):
        seen.append((directory / "last.pt").read_text())
        return {}, {}

    run_stage("train", tmp_path / "s", {"a": 1}, resumed, log=lambda m: None)
    assert seen == ["step 10"]
