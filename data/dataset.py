"""Dataset layouts: Medical Segmentation Decathlon (MSD) and nnU-Net v2 raw, read into one ``CTDataset``.

MSD: ``dataset.json`` with ``labels`` as ``{"0": "background", "1": "liver"}``, a ``training`` list of
``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}`` and a ``test`` list of paths.

nnU-Net v2 raw: ``dataset.json`` with ``labels`` as ``{"background": 0, "liver": 1}``, ``channel_names``
and ``file_ending``; images ``imagesTr/<case>_0000<ending>``, labels ``labelsTr/<case><ending>``, unlabelled
``imagesTs/<case>_0000<ending>``. Only single-channel CT is supported.

Train/validation/test splits are stored in ``splits.json`` and are authoritative once written: a resumed
run, or a user who edited the file by hand, gets exactly that split. If the dataset's case list no longer
matches the saved split, ``make_split`` refuses (delete the file to draw a new split) rather than silently
moving cases between the splits.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.atomic import write_json_atomic
from data.checks import DataError

# The three splits: training; validation (chooses checkpoints, pruning, λ, INT8); test (scored once, for the report).
SPLITS = ("train", "val", "test")


@dataclass
class CTDataset:
    """A labelled CT dataset on disk.

    Attributes:
        name: dataset name from dataset.json.
        root: dataset folder.
        layout: ``"msd"`` or ``"nnunet"``.
        labels: ``{id: name}`` including ``0: "background"``.
        training: ``[{"case_id", "image", "label"}]`` with absolute paths.
        test: ``[{"case_id", "image"}]`` unlabelled cases with absolute paths.
    """

    name: str
    root: Path
    layout: str
    labels: dict[int, str]
    training: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        """K, counting background."""
        return max(self.labels) + 1

    @property
    def case_ids(self) -> list[str]:
        """Labelled case ids, in dataset order."""
        return [c["case_id"] for c in self.training]

    def items(self, case_ids: list[str] | None = None) -> list[dict]:
        """MONAI data dicts ``{"image", "label", "case_id"}`` (str paths) for labelled cases, in the given order.

        Args:
            case_ids: cases to return; None returns all labelled cases.
        """
        by_id = {c["case_id"]: c for c in self.training}
        ids = self.case_ids if case_ids is None else list(case_ids)
        unknown = [c for c in ids if c not in by_id]
        if unknown:
            raise DataError(f"{self.root}: unknown case ids {unknown[:5]}")
        return [{"image": str(by_id[c]["image"]), "label": str(by_id[c]["label"]), "case_id": c} for c in ids]

    def test_items(self) -> list[dict]:
        """MONAI data dicts ``{"image", "case_id"}`` for the unlabelled cases."""
        return [{"image": str(c["image"]), "case_id": c["case_id"]} for c in self.test]


def _case_id_from_file(path: str, suffix: str = ".nii.gz") -> str:
    name = Path(path).name
    for s in (suffix, ".nii.gz", ".nii", ".mha", ".nrrd"):
        if name.endswith(s):
            return name[: -len(s)]
    return Path(name).stem


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: missing dataset.json (expected an MSD or nnU-Net v2 raw dataset folder)")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(info, dict):
        raise DataError(f"{path}: top level must be an object")
    return info


def _detect_layout(info: dict, path: Path) -> str:
    if "channel_names" in info or "file_ending" in info:
        return "nnunet"
    if "modality" in info or "training" in info:
        return "msd"
    raise DataError(f"{path}: cannot tell the layout (neither MSD 'modality'/'training' nor nnU-Net "
                    f"'channel_names'/'file_ending' keys)")


def _check_labels(labels: dict[int, str], path: Path) -> dict[int, str]:
    if 0 not in labels:
        raise DataError(f"{path}: labels must include background 0, got {labels}")
    if any(k < 0 for k in labels):
        raise DataError(f"{path}: negative label ids in {labels}")
    return dict(sorted(labels.items()))


def _msd_labels(info: dict, path: Path) -> dict[int, str]:
    raw = info.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: 'labels' must be a non-empty mapping id -> name")
    try:
        labels = {int(k): str(v) for k, v in raw.items()}
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: MSD 'labels' keys must be integer ids, got {list(raw)}") from exc
    return _check_labels(labels, path)


def _nnunet_labels(info: dict, path: Path) -> dict[int, str]:
    raw = info.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: 'labels' must be a non-empty mapping name -> id")
    out: dict[int, str] = {}
    for name, value in raw.items():
        if isinstance(value, (list, tuple)):
            raise DataError(f"{path}: label {name!r} is a region {value}; region-based labels are not supported")
        try:
            out[int(value)] = str(name)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{path}: nnU-Net label {name!r} must map to an integer id, got {value!r}") from exc
    return _check_labels(out, path)


def _load_msd(root: Path, info: dict, path: Path) -> CTDataset:
    training = []
    for i, entry in enumerate(info.get("training", [])):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DataError(f"{path}: training[{i}] must be {{'image': ..., 'label': ...}}, got {entry!r}")
        training.append({"case_id": _case_id_from_file(entry["image"]),
                         "image": (root / entry["image"]).resolve(), "label": (root / entry["label"]).resolve()})
    test = []
    for i, entry in enumerate(info.get("test", [])):
        rel = entry.get("image") if isinstance(entry, dict) else entry
        if not isinstance(rel, str):
            raise DataError(f"{path}: test[{i}] must be a path, got {entry!r}")
        test.append({"case_id": _case_id_from_file(rel), "image": (root / rel).resolve()})
    modality = info.get("modality", {"0": "CT"})
    if isinstance(modality, dict) and len(modality) > 1:
        raise DataError(f"{path}: {len(modality)} input channels {modality}; only single-channel CT is supported")
    return CTDataset(str(info.get("name", root.name)), root, "msd", _msd_labels(info, path), training, test)


def _load_nnunet(root: Path, info: dict, path: Path) -> CTDataset:
    channels = info.get("channel_names", info.get("modality", {"0": "CT"}))
    if not isinstance(channels, dict) or len(channels) != 1:
        raise DataError(f"{path}: channel_names {channels!r}; only single-channel CT is supported")
    channel_name = str(next(iter(channels.values())))
    if channel_name.upper() != "CT":
        warnings.warn(f"{path}: channel 0 is {channel_name!r}, not 'CT'; HU windows may not apply", stacklevel=3)
    ending = info.get("file_ending", ".nii.gz")
    training = []
    for label_path in sorted((root / "labelsTr").glob(f"*{ending}")):
        case_id = label_path.name[: -len(ending)]
        training.append({"case_id": case_id, "image": (root / "imagesTr" / f"{case_id}_0000{ending}").resolve(),
                         "label": label_path.resolve()})
    test = []
    for image_path in sorted((root / "imagesTs").glob(f"*_0000{ending}")):
        test.append({"case_id": image_path.name[: -len(f"_0000{ending}")], "image": image_path.resolve()})
    declared = info.get("numTraining")
    if declared is not None and int(declared) != len(training):
        raise DataError(f"{path}: numTraining is {declared} but labelsTr holds {len(training)} '*{ending}' files")
    return CTDataset(str(info.get("name", root.name)), root, "nnunet", _nnunet_labels(info, path), training, test)


def load_dataset(root: str | Path, layout: str = "auto") -> CTDataset:
    """Read a dataset description (paths only; use ``data.checks.check_dataset`` to validate the files).

    Args:
        root: folder holding ``dataset.json``.
        layout: ``"auto"`` (from dataset.json's keys), ``"msd"`` or ``"nnunet"``.

    Raises:
        DataError: missing/invalid dataset.json, unsupported layout, multi-channel input, no labelled case.
    """
    root = Path(root).expanduser().resolve()
    path = root / "dataset.json"
    info = _read_json(path)
    if layout == "auto":
        layout = _detect_layout(info, path)
    if layout == "msd":
        dataset = _load_msd(root, info, path)
    elif layout == "nnunet":
        dataset = _load_nnunet(root, info, path)
    else:
        raise DataError(f"{path}: unknown layout {layout!r} (use 'auto', 'msd' or 'nnunet')")
    if not dataset.training:
        raise DataError(f"{path}: no labelled training cases found ({layout} layout)")
    ids = dataset.case_ids
    if len(set(ids)) != len(ids):
        dup = sorted({c for c in ids if ids.count(c) > 1})
        raise DataError(f"{path}: duplicate case ids {dup[:5]}")
    return dataset


def make_split(dataset: CTDataset, val_fraction: float = 0.2, seed: int = 0,
               path: str | Path | None = None, test_fraction: float = 0.0) -> dict[str, list[str]]:
    """Split labelled cases into training, validation and test, reproducibly; reuse a saved split.

    Validation chooses (checkpoints, pruning, λ, the INT8 check); test is scored once, for the report.
    Test cases are drawn first from the seeded permutation, validation cases next, the rest train.

    Args:
        dataset: the dataset to split.
        val_fraction: share of cases for validation (at least one case when there are >= 2).
        seed: permutation seed.
        path: ``splits.json`` to reuse if present (must hold exactly this dataset's cases) or to write.
        test_fraction: share of cases held out for the test split (at least one when > 0 and there are >= 3).

    Returns:
        ``{"train": [case ids], "val": [case ids], "test": [case ids]}``, each sorted.

    Raises:
        DataError: a saved split that does not match the dataset's cases, or invalid fractions.
    """
    ids = sorted(dataset.case_ids)
    if path is not None and Path(path).is_file():
        saved = _read_json(Path(path))
        try:
            parts = {name: list(saved.get(name, [])) for name in SPLITS}
            if not isinstance(saved["train"], list) or not isinstance(saved["val"], list):
                raise TypeError
        except (KeyError, TypeError) as exc:
            raise DataError(f"{path}: a split file needs 'train' and 'val' lists (and optionally 'test')") from exc
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            both = set(parts[a]) & set(parts[b])
            if both:
                raise DataError(f"{path}: cases in both {a} and {b}: {sorted(both)[:5]}")
        listed = parts["train"] + parts["val"] + parts["test"]
        if sorted(listed) != ids:
            missing = sorted(set(ids) - set(listed))
            extra = sorted(set(listed) - set(ids))
            raise DataError(f"{path}: saved split does not match the dataset's cases (not in split: {missing[:5]}, "
                            f"not in dataset: {extra[:5]}); delete the file to draw a new split")
        wanted_test = float(test_fraction) > 0
        if wanted_test and not parts["test"]:
            raise DataError(f"{path}: saved split has no test cases but test_fraction={test_fraction}; delete the "
                            f"file to draw a three-way split (a figure on the validation cases that chose the "
                            f"checkpoints is not a test result)")
        return {name: sorted(parts[name]) for name in SPLITS}
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= float(value) < 1.0:
            raise DataError(f"{name} must be in [0, 1), got {value}")
    if float(val_fraction) + float(test_fraction) >= 1.0:
        raise DataError(f"val_fraction + test_fraction must leave training cases, got {val_fraction} + {test_fraction}")
    n = len(ids)
    n_test = int(round(float(test_fraction) * n))
    if test_fraction > 0 and n >= 3:
        n_test = min(max(n_test, 1), n - 2)
    n_val = int(round(float(val_fraction) * n))
    if val_fraction > 0 and n - n_test >= 2:
        n_val = min(max(n_val, 1), n - n_test - 1)
    order = np.random.default_rng(seed).permutation(n)
    test = sorted(ids[i] for i in order[:n_test])
    val = sorted(ids[i] for i in order[n_test:n_test + n_val])
    train = sorted(ids[i] for i in order[n_test + n_val:])
    split = {"train": train, "val": val, "test": test}
    if path is not None:
        write_json_atomic(path, {**split, "seed": int(seed), "val_fraction": float(val_fraction),
                                 "test_fraction": float(test_fraction)})
    return split
