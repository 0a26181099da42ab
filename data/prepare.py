"""The pipeline's data stage: a dataset on disk, checked, split, with its preprocessing spec.

Its artifact, ``<run>/data/data.json``, is what every later stage reads: the dataset root, the labels,
the preprocessing spec, and the case lists (training, validation, test, unlabelled) with absolute paths.
Validation cases choose (checkpoints, pruning, λ, the INT8 check); test cases are scored once, by the
evaluation stage and the benchmark's Dice column, and by nothing else.

The students' own data (``data.site``) is the scenario distillation is for (../shared/DESIGN.md): the teacher
is adapted on a labelled corpus (``data.source``), while the site that deploys the student has a few labelled
scans and many unlabelled ones. With ``data.site`` set, students learn from the site's cases only
(``site_labelled`` with their labels, ``site_unlabelled`` through the teacher's cache); the λ = 0 student sees
the labelled ones alone. Validation and test cases stay the corpus's, so every model is scored on the same
cases. Without it, students learn from the teacher's training split and ``unlabelled`` (the full-label
regime of a corpus). Site phantoms come from another seed stream than the corpus's, so the teacher's targets
on them are predictions on scans it never saw, as they would be at a real site.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from configs import resolve_config
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
        site: the students' own data (``data.site``): ``{"source", "root", "seed", "labelled", "unlabelled"}``,
            or None when students learn from ``train`` and ``unlabelled``.
        site_labelled: the site's cases whose label the students use, as ``train``.
        site_unlabelled: the site's cases used through the teacher only (labels withheld or absent), as
            ``unlabelled``.
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
    site: dict | None = None
    site_labelled: list[dict] = field(default_factory=list)
    site_unlabelled: list[dict] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return max(self.labels) + 1

    def corpus_fingerprint(self) -> str:
        """sha256 of what the teacher learns from and is chosen on (root, labels, preprocessing, training and
        validation cases): a teacher stage keyed on it is not retrained when only the students' site changes."""
        import hashlib

        blob = json.dumps({"root": self.root, "labels": {str(k): v for k, v in self.labels.items()},
                           "preprocess": self.preprocess, "train": self.train, "val": self.val},
                          sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    def student_cases(self) -> tuple[list[dict], list[dict]]:
        """``(labelled, unlabelled)`` cases the students learn from: the site's when ``data.site`` is set,
        else the training split and the unlabelled cases."""
        if self.site is not None:
            return list(self.site_labelled), list(self.site_unlabelled)
        return list(self.train), list(self.unlabelled)

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


def case_item(case: Mapping[str, Any], labelled: bool, prefix: str = "") -> dict:
    """A case as data.json lists it: ``{"case_id", "image"[, "label"]}`` with absolute paths; ``prefix`` goes
    before the case id (the site's cases are ``site_...``, so they never collide with the corpus's in a cache)."""
    item = {"case_id": prefix + str(case["case_id"]), "image": str(Path(case["image"]).resolve())}
    if labelled:
        item["label"] = str(Path(case["label"]).resolve())
    return item


def prepare_data(cfg: Mapping[str, Any], data_dir: str | Path, progress: bool = True) -> PreparedData:
    """Generate or locate the dataset, check it, split it and build the preprocessing spec.

    Args:
        cfg: the run config (``data``, ``preprocess``, ``run.seed`` are read), whole or partial: it is resolved
            against ``configs/schema.py`` first (missing keys take their default).
        data_dir: the stage's folder (phantoms, ``splits.json``, ``stats.json``, ``data.json`` go here).
        progress: print what is happening.

    Returns:
        The prepared data, also saved to ``data_dir/data.json``.
    """
    from data.dataset import load_dataset, make_split
    from data.stats import compute_intensity_stats, compute_zscore_stats, preprocess_spec

    cfg = resolve_config(cfg)
    data_dir = Path(data_dir)
    dcfg = cfg["data"]
    seed = int(cfg["run"]["seed"])
    source = str(dcfg["source"])
    root = _dataset_root(source, "data.source", lambda: _phantoms(
        data_dir / "phantoms", int(dcfg["phantom_cases"]), int(dcfg["phantom_test_cases"]), seed,
        dcfg["phantom_size"], progress, _workers(cfg)))

    dataset = load_dataset(root)
    dataset, noted = _checked(dataset, cfg)
    test_fraction = float(dcfg["test_fraction"])
    split = make_split(dataset, val_fraction=float(dcfg["val_fraction"]), seed=seed,
                       path=data_dir / "splits.json", test_fraction=test_fraction)
    by_id = {c["case_id"]: c for c in dataset.training}
    train = [case_item(by_id[i], True) for i in split["train"] if i in by_id]
    val = [case_item(by_id[i], True) for i in split["val"] if i in by_id]
    test = [case_item(by_id[i], True) for i in split["test"] if i in by_id]
    if not train or not val:
        raise DataStageError(f"{root}: split gives {len(train)} training and {len(val)} validation cases; need >= 1 each")
    if test_fraction > 0 and not test:
        raise DataStageError(f"{root}: data.test_fraction={test_fraction} but the split holds no test case "
                             f"({len(dataset.training)} labelled cases)")
    unlabelled = [case_item(c, False) for c in dataset.test] if dcfg["use_unlabeled"] else []

    stats = None
    if cfg["preprocess"]["intensity"] == "percentile":
        stats = compute_intensity_stats(dataset, [c["case_id"] for c in train], data_dir / "stats.json")
    elif cfg["preprocess"]["intensity"] == "zscore":
        stats = compute_zscore_stats(dataset, [c["case_id"] for c in train], data_dir / "zscore_stats.json")
    spec = preprocess_spec(cfg["preprocess"], stats)
    labels = {int(k): str(v) for k, v in dataset.labels.items()}
    prepared = PreparedData(root=str(Path(root).resolve()), labels=labels, preprocess=spec, train=train, val=val,
                            test=test, unlabelled=unlabelled, warnings=noted)
    if (dcfg["site"]["source"] or None) is not None:
        _add_site(prepared, cfg, data_dir, progress)
    prepared.save(data_dir / "data.json")
    if progress:
        print(f"[data] {len(train)} training, {len(val)} validation, {len(test)} test, {len(unlabelled)} unlabelled cases; "
              f"{prepared.num_classes} classes; spacing {spec['spacing_mm']} mm")
        if prepared.site is not None:
            print(f"[data] students' site data ({prepared.site['source']}): {len(prepared.site_labelled)} labelled + "
                  f"{len(prepared.site_unlabelled)} unlabelled cases")
    return prepared


def _dataset_root(source: str, key: str, phantoms: Any, choices: str = "'phantoms' or a dataset folder") -> Path:
    """The dataset folder a ``source`` setting names: ``phantoms()`` (which writes them on first use) for
    ``"phantoms"``, else the folder itself, refused by ``key`` when it is not one."""
    if source == "phantoms":
        return phantoms()
    root = Path(source).expanduser()
    if not root.is_dir():
        raise DataStageError(f"{key}={source!r}: not a folder (use {choices})")
    return root


def _workers(cfg: Mapping[str, Any]) -> int:
    """Processes writing phantoms: the run's threads (2 halve the demo's 90 phantoms' 27 s on 2 cores)."""
    return max(1, int(cfg["run"].get("threads") or os.cpu_count() or 1))


def _phantoms(root: Path, cases: int, test_cases: int, seed: int, size: Any, progress: bool, workers: int = 1) -> Path:
    """The phantom dataset under ``root``, written on first use (``workers`` processes)."""
    from data.phantom_dataset import write_dataset

    if not (root / "dataset.json").is_file():
        if progress:
            print(f"[data] writing {cases} + {test_cases} phantoms (seed {seed}) to {root}")
        write_dataset(root, cases=cases, test_cases=test_cases, seed=seed, size=tuple(int(s) for s in size),
                      workers=workers)
    return root


def _checked(dataset: Any, cfg: Mapping[str, Any]) -> tuple[Any, list[str]]:
    """``data.checks.check_dataset`` over a dataset, and the warnings it gave (kept for the report)."""
    from data.checks import BadCaseWarning, PlausibilityWarning, check_dataset

    dcfg = cfg["data"]
    # The runtime's plausibility judgement (deploy/plausibility.py) applies to every case, against the student's
    # window at the run's spacing; data.force_implausible keeps refused images (with a warning) for unusual CT.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checked = check_dataset(dataset, skip_bad=bool(dcfg["skip_bad_cases"]), force=bool(dcfg["force_implausible"]),
                                spacing_mm=cfg["preprocess"]["spacing_mm"], roi_size=cfg["student"]["roi_size"])
    noted = [str(w.message) for w in caught if issubclass(w.category, (BadCaseWarning, PlausibilityWarning))]
    for w in caught:  # shown as they would have been, and kept for the report
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return (checked if checked is not None else dataset), noted  # check_dataset returns it without skipped cases


def _add_site(prepared: PreparedData, cfg: Mapping[str, Any], data_dir: Path, progress: bool) -> None:
    """The students' own data (``data.site``): checked like the corpus, its labels the corpus's, a seeded
    choice of ``site.labelled`` cases keeping their label and the rest (and the site's unlabelled scans)
    used through the teacher only."""
    import numpy as np

    from data.dataset import load_dataset

    scfg = cfg["data"]["site"]
    seed = int(cfg["run"]["seed"])
    source = str(scfg["source"])
    if source == "phantoms":
        site_seed = int(seed + 1000 if scfg["phantom_seed"] is None else scfg["phantom_seed"])
    else:
        site_seed = None
    if site_seed == seed:
        raise DataStageError(f"data.site.phantom_seed={site_seed} is the corpus's seed (run.seed): the site would "
                             "hold the teacher's own training phantoms; choose another seed")
    root = _dataset_root(source, "data.site.source", lambda: _phantoms(
        data_dir / "site", int(scfg["phantom_cases"]), int(scfg["phantom_test_cases"]), site_seed,
        cfg["data"]["phantom_size"], progress, _workers(cfg)), choices="null, 'phantoms' or a dataset folder")
    dataset = load_dataset(root)
    site_labels = {int(k): str(v) for k, v in dataset.labels.items()}
    if site_labels != prepared.labels:
        raise DataStageError(f"data.site.source={source!r} ({root}): labels {site_labels} differ from the corpus's "
                             f"{prepared.labels}; the students' data must use the teacher's classes")
    dataset, noted = _checked(dataset, cfg)
    prepared.warnings.extend(f"site: {w}" for w in noted)
    cases = sorted(dataset.training, key=lambda c: str(c["case_id"]))
    wanted = scfg["labelled"]
    count = len(cases) if wanted in (None, "all") else int(wanted)
    if not 0 <= count <= len(cases):
        raise DataStageError(f"data.site.labelled={wanted!r}: the site ({root}) has {len(cases)} labelled cases")
    # The labelled subset is a seeded draw, so 8 of 40 are not simply the first 8 generated.
    order = np.random.default_rng(np.random.SeedSequence([seed, 77])).permutation(len(cases))
    keep = {cases[i]["case_id"] for i in order[:count]}
    prepared.site_labelled = [case_item(c, True, "site_") for c in cases if c["case_id"] in keep]
    prepared.site_unlabelled = ([case_item(c, False, "site_") for c in cases if c["case_id"] not in keep]
                                + [case_item(c, False, "site_") for c in dataset.test])
    prepared.site = {"source": source, "root": str(Path(root).resolve()), "seed": site_seed,
                     "labelled": len(prepared.site_labelled), "unlabelled": len(prepared.site_unlabelled),
                     "labels_withheld": len(cases) - count}
