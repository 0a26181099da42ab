"""benchmarks.train_step: the step harness runs the teacher too, in the layouts training uses."""
import json

from benchmarks import train_step


def test_teacher_steps_are_timed_per_setting_including_channels_last(tmp_path):
    """``--teacher`` builds the config's teacher (2-D SAM weights beside 3-D ones, which Module.to(channels_last_3d)
    refuses) and times it per setting; the report names the teacher and leaves its FLOP columns empty."""
    out = tmp_path / "ts"
    result = train_step.main(["--teacher", "--config", "configs/demo.yaml", "--roi", "16", "16", "16", "--batch", "1",
                              "--steps", "1", "--warmup", "0", "--rounds", "1", "--threads", "1",
                              "--settings", "base", "channels_last", "--out", str(out)])
    assert result["student"] == "teacher" and result["roi_size"] == [16, 16, 16]
    assert [r["setting"] for r in result["rows"]] == ["base", "channels_last"]
    assert all(r["s_per_step"] > 0 and r["gflop_per_step"] is None and r["window_size"] == 4 for r in result["rows"])
    assert json.loads((out / "train_step.json").read_text())["rows"] == result["rows"]
    assert "# Teacher training step" in (out / "train_step.md").read_text()
