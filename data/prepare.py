"""The pipeline's data stage: a dataset on disk, checked, split, with its preprocessing spec.

Its artifact, ``<run>/data/data.json``, is what every later stage reads: the dataset root, the labels,
the preprocessing spec, and the case lists (training, validation, test, unlabelled) with absolute paths.
Validation cases choose (checkpoints, pruning, λ, the INT8 check); test cases are scored once, by the
evaluation stage and the benchmark's Dice column, and by nothing else.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from data.atomic import write_json_atomic


class DataStageError(ValueError):
    """A data artifact or data config that cannot be used; the message names the file or key."""


@dataclass
class PreparedData:
    """Everything later stages need to know about the data.

    Attributes:
        root: dataset folder (MSD or nnU-Net raw layout).
        labels: ``{class id: name}`` including ``0: "background"``.
        preprocess: preprocessing spec (docs/interfaces.md).
        train: labelled training cases ``{"case_id", "image", "label"}``.
        val: held-out labelled cases that choose checkpoints, λ and INT8 settings, same form.
        test: held-out labelled cases scored once, for the report, same form.
        unlabelled: cases without a label ``{"case_id", "image"}`` (e.g. ``imagesTs``).
        warnings: what the checks warned about (skipped cases, unusual but usable images); the report
            carries them.
    """

    root: str
    labels: dict[int, str]
    preprocess: dict
    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)
    unlabelled: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return max(self.labels) + 1

    def scoring_split(self) -> tuple[str, list[dict]]:
        """The split a reported figure is scored on: ``("test", test cases)``, or ``("val", validation cases)``
        for a run without a test split (``data.test_fraction: 0``), whose figures the report marks as chosen on
        the same cases and therefore optimistic."""
        return ("test", self.test) if self.test else ("val", self.val)

    def save(self, path: str | Path) -> Path:
        """Write the artifact as JSON (atomic)."""
        payload = asdict(self)
        payload["labels"] = {str(k): v for k, v in self.labels.items()}
        return write_json_atomic(path, payload)

    @classmethod
    def load(cls, path: str | Path) -> "PreparedData":
        """Read an artifact written by ``save``."""
        path = Path(path)
        if not path.is_file():
            raise DataStageError(f"{path}: no data artifact (run the data stage: python distill/run.py)")
        try:
            payload = json.loads(path.read_text())
            payload["labels"] = {int(k): v for k, v in payload["labels"].items()}
            return cls(**payload)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise DataStageError(f"{path}: not a data artifact ({exc})") from exc


def _as_item(case: Mapping[str, Any], labelled: bool) -> dict:
    item = {"case_id": str(case["case_id"]), "image": str(Path(case["image"]).resolve())}
    if labelled:
        item["label"] = str(Path(case["label"]).resolve())
    return item


def prepare_data(cfg: Mapping[str, Any], data_dir: str | Path, progress: bool = True) -> PreparedData:
    """Generate or locate the dataset, check it, split it and build the preprocessing spec.

    Args:
        cfg: the run config (``data``, ``preprocess``, ``run.seed`` are read).
        data_dir: the stage's folder (phantoms, ``splits.json``, ``stats.json``, ``data.json`` go here).
        progress: print what is happening.

    Returns:
        The prepared data, also saved to ``data_dir/data.json``.
    """
    from data.checks import BadCaseWarning, PlausibilityWarning, check_dataset
    from data.dataset import load_dataset, make_split
    from data.stats import compute_intensity_stats, compute_zscore_stats, preprocess_spec

    data_dir = Path(data_dir)
    dcfg = cfg["data"]
    seed = int(cfg.get("run", {}).get("seed", 0))
    source = str(dcfg.get("source", "phantoms"))
    if source == "phantoms":
        from data.phantom import write_dataset

        root = data_dir / "phantoms"
        if not (root / "dataset.json").is_file():
            if progress:
                print(f"[data] writing {dcfg['phantom_cases']} + {dcfg.get('phantom_test_cases', 0)} phantoms to {root}")
            write_dataset(
                root,
                cases=int(dcfg["phantom_cases"]),
                test_cases=int(dcfg.get("phantom_test_cases", 0)),
                seed=seed,
                size=tuple(int(s) for s in dcfg["phantom_size"]),
            )
    else:
        root = Path(source).expanduser()
        if not root.is_dir():
            raise DataStageError(f"data.source={source!r}: not a folder (use 'phantoms' or a dataset folder)")

    dataset = load_dataset(root)
    # The runtime's plausibility judgement (deploy/plausibility.py) applies to every case, against the student's
    # window at the run's spacing; data.force_implausible keeps refused images (with a warning) for unusual CT.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checked = check_dataset(dataset, skip_bad=bool(dcfg.get("skip_bad_cases", False)),
                                force=bool(dcfg.get("force_implausible", False)),
                                spacing_mm=cfg["preprocess"].get("spacing_mm"),
                                roi_size=(cfg.get("student") or {}).get("roi_size"))
    noted = [str(w.message) for w in caught if issubclass(w.category, (BadCaseWarning, PlausibilityWarning))]
    for w in caught:  # shown as they would have been, and kept for the report
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if checked is not None:  # check_dataset returns the dataset without the skipped cases
        dataset = checked
    test_fraction = float(dcfg.get("test_fraction", 0.0))
    split = make_split(dataset, val_fraction=float(dcfg.get("val_fraction", 0.2)), seed=seed,
                       path=data_dir / "splits.json", test_fraction=test_fraction)
    by_id = {c["case_id"]: c for c in dataset.training}
    train = [_as_item(by_id[i], True) for i in split["train"] if i in by_id]
    val = [_as_item(by_id[i], True) for i in split["val"] if i in by_id]
    test = [_as_item(by_id[i], True) for i in split["test"] if i in by_id]
    if not train or not val:
        raise DataStageError(f"{root}: split gives {len(train)} training and {len(val)} validation cases; need >= 1 each")
    if test_fraction > 0 and not test:
        raise DataStageError(f"{root}: data.test_fraction={test_fraction} but the split holds no test case "
                             f"({len(dataset.training)} labelled cases)")
    unlabelled = [_as_item(c, False) for c in dataset.test] if dcfg.get("use_unlabeled", True) else []

    stats = None
    if cfg["preprocess"].get("intensity") == "percentile":
        stats = compute_intensity_stats(dataset, [c["case_id"] for c in train], data_dir / "stats.json")
    elif cfg["preprocess"].get("intensity") == "zscore":
        stats = compute_zscore_stats(dataset, [c["case_id"] for c in train], data_dir / "zscore_stats.json")
    spec = preprocess_spec(cfg["preprocess"], stats)
    labels = {int(k): str(v) for k, v in dataset.labels.items()}
    prepared = PreparedData(root=str(Path(root).resolve()), labels=labels, preprocess=spec, train=train, val=val,
                            test=test, unlabelled=unlabelled, warnings=noted)
    prepared.save(data_dir / "data.json")
    if progress:
        print(f"[data] {len(train)} training, {len(val)} validation, {len(test)} test, {len(unlabelled)} unlabelled cases; "
              f"{prepared.num_classes} classes; spacing {spec['spacing_mm']} mm")
    return prepared
