"""The typed config (configs/schema.py): defaults filled, unknown keys and wrong types refused by name."""
import re
from pathlib import Path

import pytest
import yaml

from configs import CONFIG_DIR, ConfigError, flatten, load_config, resolve_config
from configs.schema import EvaluationConfig, TuneConfig, defaults, known_keys


def test_unknown_key_in_a_file_names_its_path_and_the_nearest_name(tmp_path):
    p = tmp_path / "typo.yaml"
    p.write_text("base: demo\nteacher:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml.*'teacher\.stpes'.*did you mean 'teacher\.steps'"):
        load_config(p)


def test_unknown_key_in_a_base_preset_names_that_file(tmp_path):
    (tmp_path / "base.yaml").write_text("data:\n  site:\n    labeled: 3\n")
    top = tmp_path / "top.yaml"
    top.write_text(f"base: {tmp_path / 'base.yaml'}\n")
    with pytest.raises(ConfigError, match=r"base\.yaml.*'data\.site\.labeled'.*'data\.site\.labelled'"):
        load_config(top)


def test_unknown_key_in_an_override_names_its_path_and_the_nearest_name():
    with pytest.raises(ConfigError, match=r"'teacher\.stpes'.*did you mean 'teacher\.steps'"):
        load_config("demo", ["teacher.stpes=3"])
    with pytest.raises(ConfigError, match=r"'evaluaton'.*did you mean 'evaluation'"):
        load_config("demo", ["evaluaton.overlap=0.5"])


def test_a_known_key_the_file_does_not_set_can_be_overridden_and_free_form_sections_take_new_keys():
    cfg = load_config("demo", ["teacher.poly_power=1.0", "teacher.arch.embed_dim=96", "teacher.lr=1e-3"])
    assert cfg["teacher"]["poly_power"] == 1.0
    assert cfg["teacher"]["arch"] == {"window_size": 4, "embed_dim": 96}
    assert cfg["teacher"]["lr"] == 1e-3 and isinstance(cfg["teacher"]["lr"], float)  # YAML 1.1 reads "1e-3" as str


def test_a_missing_key_gets_its_default(tmp_path):
    p = tmp_path / "small.yaml"
    p.write_text("run:\n  name: small\nevaluation:\n  nsd_tolerance_mm: 3.0\n")
    cfg = load_config(p)
    assert cfg["evaluation"] == {"nsd_tolerance_mm": 3.0, "overlap": EvaluationConfig.overlap}
    assert cfg["tune"] == defaults(TuneConfig)
    assert cfg["data"]["site"]["source"] is None and cfg["run"]["name"] == "small"
    assert cfg["teacher"]["preset"] == "tiny" and cfg["teacher"]["peft"] == "adapter"  # the 2D SAM backbone's


def test_backbone_dependent_defaults():
    cfg = resolve_config({"teacher": {"backbone": "sam_med3d"}})
    assert cfg["teacher"]["preset"] == "vit_b_ori" and cfg["teacher"]["peft"] == "lora"


def test_partial_dicts_resolve_and_resolving_is_idempotent():
    cfg = resolve_config({"distill": {"steps": 7}, "data": {"site": None}})
    assert cfg["distill"]["steps"] == 7 and cfg["distill"]["schedule"] == "constant"
    assert cfg["data"]["site"] == defaults()["data"]["site"]
    assert resolve_config(cfg) == cfg
    sections = {k for k in known_keys() if k.count(".") == 0 or k == "data.site"}
    assert set(flatten(cfg)) == set(known_keys()) - sections


@pytest.mark.parametrize("override, key", [("teacher.steps=abc", "teacher.steps"), ("distill.amp=3", "distill.amp"),
                                           ("student.names=tiny", "student.names"),
                                           ("export.int8=yes please", "export.int8"),
                                           ("run.seed=1.5", "run.seed")])
def test_a_wrong_type_is_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config("demo", [override])


def test_a_bool_is_no_number_and_an_int_is_a_float():
    with pytest.raises(ConfigError, match="'distill.lr'"):
        resolve_config({"distill": {"lr": True}})
    assert resolve_config({"distill": {"lr": 1}})["distill"]["lr"] == 1


def test_a_section_that_is_not_a_mapping_is_refused():
    with pytest.raises(ConfigError, match="teacher"):
        resolve_config({"teacher": 3})


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_resolves(path):
    cfg = load_config(path)
    assert set(cfg) == set(defaults())


def _raw(path: Path) -> dict:
    from configs import merge

    raw = yaml.safe_load(path.read_text())
    base = raw.pop("base", None)
    return merge(_raw(CONFIG_DIR / f"{base}.yaml"), raw) if base else raw


@pytest.mark.parametrize("name", ["demo", "btcv", "sam_med3d", "sam_med3d_demo"])
def test_resolving_keeps_every_value_a_file_sets(name):
    raw, cfg = flatten(_raw(CONFIG_DIR / f"{name}.yaml")), flatten(load_config(name))
    changed = {k: (v, cfg.get(k)) for k, v in raw.items()
               if k not in cfg or cfg[k] != v or type(cfg[k]) is not type(v)}
    assert changed == {}


def test_the_pipeline_logs_and_saves_the_resolved_config(tmp_path):
    import contextlib

    from pipeline import Pipeline

    logged = {}

    class Recorder:
        @contextlib.contextmanager
        def start_run(self, *args, **kwargs):
            yield

        def log_text(self, text, name):
            logged[name] = text

        def set_tags(self, tags):
            logged.update(tags)

    pipe = Pipeline({"run": {"name": "partial", "device": "cpu", "threads": None}, "teacher": {"steps": 3}},
                    out_dir=tmp_path / "run", log=lambda line: None)
    pipe.tracker = Recorder()
    with pipe.tracking():
        pass
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved == yaml.safe_load(logged["config.yaml"]) == pipe.cfg == resolve_config(pipe.cfg)
    assert saved["teacher"]["steps"] == 3 and saved["evaluation"]["overlap"] == EvaluationConfig.overlap


def test_a_tuple_from_code_is_a_list_and_a_path_is_no_string():
    from pathlib import Path as P

    assert resolve_config({"teacher": {"roi_size": (32, 32, 32)}})["teacher"]["roi_size"] == (32, 32, 32)
    with pytest.raises(ConfigError, match="'data.source'"):
        resolve_config({"data": {"source": P("/tmp")}})


@pytest.mark.parametrize("budget, message", [
    ("{swinunetr_smal: 200}", "student.steps.swinunetr_smal: no student is called 'swinunetr_smal' (did you mean 'swinunetr_small'?)"),
    ("{swinunetr_tiny: 0}", "student.steps.swinunetr_tiny: expected a positive number of steps, got 0"),
    ("{swinunetr_tiny: 2.5}", "student.steps.swinunetr_tiny: expected a positive number of steps, got 2.5"),
    ("{swinunetr_tiny: true}", "student.steps.swinunetr_tiny: expected a positive number of steps, got True"),
])
def test_a_student_budget_for_an_unknown_student_or_of_no_steps_is_refused_before_any_stage(budget, message, tmp_path):
    from pipeline import Pipeline

    cfg = load_config("demo", [f"student.steps={budget}", "run.threads=null"])
    with pytest.raises(ConfigError, match=re.escape(message)):
        Pipeline(cfg, out_dir=tmp_path / "run", log=lambda line: None)
    assert not (tmp_path / "run").exists()


def test_student_budgets_by_name_for_the_students_a_run_trains():
    from pipeline.pipeline import student_budgets

    assert student_budgets(load_config("demo")) == {"swinunetr_small": 300}
    assert student_budgets(load_config("demo_full")) == {}
    # The demo's budget of its small student means nothing to a run that trains the tiny one alone.
    assert student_budgets(load_config("demo", ["student.names=[swinunetr_tiny]"])) == {}
