"""The config's schema: one dataclass per section, holding every key the code reads and its default (the only place
a default is written). :func:`resolve` checks a loaded config against it and returns the plain nested dict the
stages take: every missing key filled with its default, an unknown key (in a file, its ``base:`` preset or an
override) refused with its dotted path and the nearest known name, each value checked against its annotation.

Values are kept as given (a YAML ``2`` for a float key stays ``2``), so the resolved dict of a config that sets a key
holds exactly what it set; only a float written ``1e-3`` (which YAML 1.1 reads as a string) becomes a float.

Where a key had no default in the code (the code required it), the default is the demo's value, marked "demo";
where the code's fallbacks disagreed, the one the demo runs with (noted at the key).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Union


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file or key."""


@dataclass
class RunConfig:
    name: str = "run"  # runs/<name>/; required before (no code default)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch threads; None = torch's default (export: 2)
    # Minutes this invocation may take: a student after the first of student.names that would take the run past it
    # is left out, named in the report (pipeline/budget.py). None: every student trains.
    time_budget_minutes: float | None = None


@dataclass
class SiteConfig:
    """``data.site``: the students' own data (data/prepare.py)."""

    source: str | None = None  # null: the corpus's training split | phantoms | a dataset folder
    phantom_cases: int = 40
    phantom_test_cases: int = 0
    phantom_seed: int | None = None  # None = run.seed + 1000
    labelled: int | str | None = "all"  # site cases whose label the students get; all (or null) = every case


@dataclass
class DataConfig:
    source: str = "phantoms"  # phantoms | an MSD or nnU-Net v2 raw dataset folder
    phantom_cases: int = 50  # demo
    phantom_test_cases: int = 0
    phantom_size: list = field(default_factory=lambda: [160, 128, 48])
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    skip_bad_cases: bool = False
    force_implausible: bool = False
    use_unlabeled: bool = True
    site: SiteConfig = field(default_factory=SiteConfig)  # null reads as every default (site.source null)


@dataclass
class PreprocessConfig:
    spacing_mm: list | None = None  # None = the training cases' median spacing
    orientation: str = "RAS"
    intensity: str = "window"  # window | percentile | zscore
    hu_window: list | None = field(default_factory=lambda: [-175.0, 250.0])  # window mode only; demo


# Defaults of teacher keys that depend on teacher.backbone (a null or absent key takes its backbone's).
BACKBONE_DEFAULTS: dict[str, dict[str, Any]] = {
    "sam2d": {"preset": "tiny", "peft": "adapter"},
    "sam_med3d": {"preset": "vit_b_ori", "peft": "lora"},
}


@dataclass
class TeacherConfig:
    backbone: str = "sam2d"  # sam2d (the adapted 2D SAM) | sam_med3d
    preset: str | None = None  # None = the backbone's (BACKBONE_DEFAULTS)
    checkpoint: str | None = None  # official SAM / SAM-Med3D weights; None = random init
    checkpoint_file: str | None = None  # a trained teacher.pt to reuse
    allow_preprocess_mismatch: bool = False
    peft: str | None = None  # None = the backbone's (BACKBONE_DEFAULTS)
    lora_rank: int = 4
    prompt_mode: str = "auto"  # auto | points | both
    apg_hidden: int = 64  # SAM-Med3D's auto prompt generator width
    arch: dict | None = None  # free-form TeacherArch fields over the preset (2D SAM only)
    roi_size: list | None = None  # None = the preset's
    batch_size: int = 2  # teacher/train.py's loader said 2, its check 1
    crops_per_case: int = 1
    class_balanced: bool = True
    flip_prob: float = 0.1  # = data.transforms.DEFAULT_FLIP_PROB
    rotate_prob: float = 0.1  # = data.transforms.DEFAULT_ROTATE_PROB
    affine_prob: float = 0.0
    affine_rotate_deg: float = 15.0
    affine_scale: float = 0.1
    intensity_prob: float = 0.0
    intensity_shift: float = 0.1
    intensity_scale: float = 0.1
    steps: int = 500  # demo
    lr: float = 1.0e-3  # demo
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | poly | cosine
    poly_power: float = 0.9
    grad_clip: float | None = 1.0
    ema_decay: float = 0.0
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0
    dice_batch: bool = False
    max_positive_clicks: int = 3
    max_negative_clicks: int = 2
    val_every: int = 0  # 0 = only at the end
    amp: bool | str = True  # true | false | bf16 | fp16
    # CPU: batch-1 3D convolutions that ATen would run on its slow path go to oneDNN in depth slabs (training/slab_conv.py)
    slab_conv: bool = True
    # CPU: train in torch.channels_last_3d (faster oneDNN convolutions; training/settings.py). configs/demo.yaml sets it
    # for the tiny SAM teacher (1.14x per float32 step capped to AVX2); unmeasured for SAM-Med3D and the ViT-B presets.
    channels_last: bool = False
    log_every: int = 10
    grad_checkpointing: bool = False
    num_workers: int = 0


@dataclass
class StudentConfig:
    names: list = field(default_factory=lambda: ["swinunetr_tiny", "swinunetr_small"])  # demo
    roi_size: list = field(default_factory=lambda: [64, 64, 32])  # demo
    arch: dict | None = None  # free-form options over the registry's (student/registry.py)
    # Step budgets of single students over distill.steps, by name ({swinunetr_small: 200}); null: distill.steps for all
    steps: dict | None = None


@dataclass
class DistillConfig:
    lambda_kd: float = 0.5
    seed: int | None = None  # the students' seed (init, crops); None = run.seed
    # constant: λ all along | linear: from λ down to lambda_end_ratio·λ, imitation first and the labels at the end (distill/loss.py)
    lambda_schedule: str = "constant"
    lambda_end_ratio: float = 0.0  # linear: λ falls to this fraction of itself (0: to the labels alone)
    kd_target: str = "logits"  # logits | probs | sqrt_probs
    temperature: float = 1.0
    pseudo_labels: bool = False
    kd_weighting: str = "uniform"  # uniform | class_balanced
    labelled_fraction: float | None = None
    # The labelled share at the run's last step, linear from labelled_fraction (null: constant; distill/sampling.py)
    labelled_fraction_end: float | None = None
    mode: str = "cached"  # cached | online
    cache_downsample: int = 2
    batch_size: int = 1  # demo
    crops_per_case: int = 1
    # 0: a flip of the first axis or an axial turn puts the left organs on the right while the label keeps calling them
    # left; 400-step students then confused the kidneys (docs/measurements.md, "Flips that swap left and right").
    flip_prob: float = 0.0
    rotate_prob: float = 0.0
    num_workers: int = 0
    steps: int = 400  # demo
    lr: float = 3.0e-3  # demo
    weight_decay: float = 0.0
    warmup_steps: int = 0
    # constant: what the demo runs and training.settings.TrainSettings' default (distill/train.py's own fallback
    # and the pipeline's trial check said poly)
    schedule: str = "constant"
    poly_power: float = 0.9
    grad_clip: float | None = 1.0
    ema_decay: float = 0.0
    val_every: int = 0
    amp: bool | str = True
    # CPU: batch-1 3D convolutions that ATen would run on its slow path go to oneDNN in depth slabs (training/slab_conv.py)
    slab_conv: bool = True
    # CPU: train in torch.channels_last_3d: 1.17-1.18x on a SwinUNETR-tiny step over slab_conv alone (configs/demo.yaml)
    channels_last: bool = True
    log_every: int = 10
    baseline_lambda_zero: bool = True
    # largest_component: keep only each organ's largest piece, for the classes whose validation Dice that raises
    # (chosen per student after training, stored in student.pt and the bundle; deploy/postprocess.py) | none
    postprocess: str = "largest_component"


@dataclass
class TuneConfig:
    """The λ search (distill/tune_settings.py checks the values; docs/tuning.md explains each)."""

    enabled: bool = True  # as the demo and distill/tune_settings.py had it (the pipeline's own fallback said false)
    trials: int = 6
    steps_per_trial: int = 40
    report_every: int = 10
    lambda_space: str = "uniform"
    lambda_min: float = 1.0e-3
    search_temperature: bool = False
    temperature_range: list = field(default_factory=lambda: [1.0, 4.0])
    search_lr: bool = False
    lr_range: list = field(default_factory=lambda: [3.0e-4, 3.0e-3])
    pruner: str = "median"
    pruner_startup_trials: int = 2
    pruner_warmup_steps: int = 0
    storage: str | None = None
    study_name: str | None = None
    objectives: list = field(default_factory=lambda: ["dice"])
    students: list | None = None
    heartbeat_s: int = 30
    grace_s: int = 120
    max_retry: int = 2
    max_consecutive_failures: int = 3
    latency_repeats: int = 10
    continue_trials: bool = True
    # Trial processes side by side on this machine (distill/tune_local.py), each with run.threads // workers torch
    # threads; 1: one trial at a time in the pipeline's process.
    workers: int = 1


@dataclass
class EvaluationConfig:
    nsd_tolerance_mm: float = 2.0
    overlap: float = 0.25  # sliding-window overlap of every whole-volume inference


@dataclass
class ExportConfig:
    enabled: bool = True
    int8: bool = True
    max_dice_drop: float = 0.01
    calibration_crops: int = 8
    max_restore_iterations: int | None = None
    min_fp32_dice: float = 0.0
    onnxruntime_int8: bool = True
    dynamic_batch: bool = True  # try a dynamic batch axis first (kept only where both runtimes reproduce PyTorch)
    # PyTorch module names kept float32 in the OpenVINO INT8 model; null: the student's (student.INT8_FP32_MODULES)
    int8_fp32_modules: list | None = None


@dataclass
class BenchmarkConfig:
    enabled: bool = True
    quick: bool = False
    threads: list = field(default_factory=lambda: [2])
    workloads: list = field(default_factory=lambda: ["patch", "volume", "ct"])  # benchmarks.latency.WORKLOADS
    runtimes: list | None = field(default_factory=lambda: ["pytorch", "onnxruntime", "openvino"])  # null = all
    precisions: list | None = field(default_factory=lambda: ["fp32", "bf16", "int8"])  # null = all
    max_dice_cases: int | None = None
    cross_check: bool = True
    volume: str | None = None  # NIfTI for the volume workload; None = a phantom


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)


def defaults(section: type | None = None) -> dict:
    """The defaults of one section class (or of the whole config) as a plain dict."""
    return dataclasses.asdict((section or Config)())


def known_keys(section: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of a section class (sections included), e.g. ``teacher.steps``, ``data.site.source``."""
    out = []
    for name, typ in typing.get_type_hints(section).items():
        out.append(prefix + name)
        if dataclasses.is_dataclass(typ):
            out.extend(known_keys(typ, f"{prefix}{name}."))
    return out


def resolve(cfg: Mapping[str, Any] | None) -> dict:
    """Check ``cfg`` against the schema; return it as a plain dict with every missing key at its default.

    A partial config (some sections, or sections with some keys) is filled; ``cfg`` is not changed (the result
    shares nothing with it). Raises :class:`ConfigError` naming
    the dotted key of an unknown key (and the nearest known one) or of a value of the wrong type.
    """
    return _resolve_section(Config, copy.deepcopy(dict(cfg or {})), "")


def _resolve_section(cls: type, given: Any, prefix: str) -> dict:
    if not isinstance(given, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {given!r}")
    hints = typing.get_type_hints(cls)
    for key in given:
        if key not in hints:
            path = f"{prefix}{key}"
            near = difflib.get_close_matches(str(key), list(hints), n=1)
            hint = f" (did you mean {prefix + near[0]!r}?)" if near else f" (known: {', '.join(hints)})"
            raise ConfigError(f"unknown config key {path!r}{hint}")
    out: dict[str, Any] = {}
    default = dataclasses.asdict(cls())
    for f in dataclasses.fields(cls):
        typ, path = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(typ):
            value = given.get(f.name)
            out[f.name] = _resolve_section(typ, {} if value is None else value, path + ".")
        elif f.name in given:
            out[f.name] = _check(path, given[f.name], typ)
        else:
            out[f.name] = default[f.name]
    if cls is TeacherConfig:
        for key, value in BACKBONE_DEFAULTS.get(out["backbone"], {}).items():
            if out[key] is None:
                out[key] = value
    return out


def check_path(parts: list[str]) -> None:
    """Refuse a dotted key the schema does not know (naming it and the nearest known name); a key inside a
    free-form section (``teacher.arch.embed_dim``) is known."""
    cls: Any = Config
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        prefix = "".join(p + "." for p in parts[:i])
        if part not in hints:
            near = difflib.get_close_matches(part, list(hints), n=1)
            hint = f" (did you mean {prefix + near[0]!r}?)" if near else f" (known: {', '.join(hints)})"
            raise ConfigError(f"unknown config key {prefix + part!r}{hint}")
        typ = hints[part]
        if dataclasses.is_dataclass(typ):
            cls = typ
        elif i < len(parts) - 1:
            if dict in _options(typ):
                return  # free-form: its keys are its consumer's to check
            raise ConfigError(f"config key {prefix + part!r} is a value, not a section")


def _options(typ: Any) -> tuple:
    if typing.get_origin(typ) in (Union, types.UnionType):
        return typing.get_args(typ)
    return (typ,)


def _check(path: str, value: Any, typ: Any) -> Any:
    """``value`` if it fits ``typ`` (a float key takes an int; ``"1e-3"`` becomes 1e-3), else ConfigError."""
    options = _options(typ)
    for option in options:
        if option is Any:
            return value
        if option is type(None) and value is None:
            return value
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if option is str and isinstance(value, str):
            return value
        if option is list and isinstance(value, (list, tuple)):  # a tuple from code is kept as given
            return value
        if option is dict and isinstance(value, Mapping):
            return value
    if float in options and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    names = " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"config key {path!r}: expected {names}, got {value!r} ({type(value).__name__})")
