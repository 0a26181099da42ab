"""Config loading: presets by name, dotted overrides, clear errors on typos."""
import pytest

from configs import ConfigError, config_hash, flatten, load_config


def test_demo_preset_loads_by_name_and_overrides_apply():
    assert load_config("demo")["student"]["names"] == ["swinunetr_tiny", "swinunetr_small"]
    cfg = load_config("demo", ["teacher.steps=7", "distill.lambda_kd=0.25", "student.names=[swinunetr_tiny]"])
    assert cfg["teacher"]["steps"] == 7
    assert cfg["distill"]["lambda_kd"] == 0.25
    assert cfg["student"]["names"] == ["swinunetr_tiny"]


def test_unknown_key_is_refused_with_its_name():
    with pytest.raises(ConfigError, match="techer"):
        load_config("demo", ["techer.steps=1"])


def test_override_without_equals_is_refused():
    with pytest.raises(ConfigError, match="key=value"):
        load_config("demo", ["teacher.steps"])


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_base_preset_is_merged_underneath(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("base: demo\nteacher:\n  steps: 3\n")
    cfg = load_config(p)
    assert cfg["teacher"]["steps"] == 3 and cfg["teacher"]["preset"] == "tiny"


def test_hash_changes_with_content_and_flatten_is_dotted():
    a = load_config("demo")
    b = load_config("demo", ["teacher.lr=0.5"])
    assert config_hash(a["teacher"]) != config_hash(b["teacher"])
    assert config_hash(a["teacher"]) == config_hash(load_config("demo")["teacher"])
    assert flatten({"a": {"b": 1}, "c": 2}) == {"a.b": 1, "c": 2}
