"""Synthetic abdominal CT phantoms with organ labels, written as an MSD-layout dataset.

``write_dataset`` writes labelled training cases (imagesTr, labelsTr), unlabelled test cases (imagesTs) and
``dataset.json`` (with a ``generator`` entry that tells a pipeline whether an existing dataset is the one it
would write). Case ``i`` of a split is drawn from its own stream (:func:`case_rng`), so a case does not
depend on how many are written. ``main`` is the command line, run as ``python -m data.phantom``::

    python -m data.phantom --out runs/phantoms --cases 16 --test-cases 4 --seed 0 --size 160 128 48 --preview
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import nibabel as nib
import numpy as np

from data.atomic import atomic_path, write_json_atomic
from data.phantom import DEFAULT_SIZE, LABELS, PHANTOM_VERSION, PhantomError, field_of_view, make_phantom, validate_size
from data.phantom_preview import render_preview


def dataset_labels(label_gallbladder: bool = False) -> dict[int, str]:
    """The phantom's class names, ``{id: name}`` including background."""
    return {k: v for k, v in LABELS.items() if k != 8 or label_gallbladder}


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, tmp)


def case_rng(seed: int, split: int, index: int) -> np.random.Generator:
    """The random stream of case ``index`` of a split (0 training, 1 test) of dataset ``seed``.

    Each case has its own stream, so a case's content does not depend on how many cases are written.
    """
    return np.random.default_rng(np.random.SeedSequence([int(seed), split, index]))


def _write_case(job: tuple) -> dict:
    """Generate and save one case (in a worker process): its dataset entries, organ volumes and mean HU, and the
    arrays for the preview when asked."""
    split, i, seed, size, label_gallbladder, spacing_mm, root, classes, keep_arrays = job
    root = Path(root)
    case_id = f"phantom_{i:03d}" if split == 0 else f"phantom_ts_{i:03d}"
    t0 = time.perf_counter()
    image, label, affine = make_phantom(case_rng(seed, split, i), size, label_gallbladder=label_gallbladder,
                                        spacing_mm=spacing_mm)
    seconds = time.perf_counter() - t0
    out: dict = {"split": split, "image": f"./imagesTr/{case_id}.nii.gz" if split == 0 else f"./imagesTs/{case_id}.nii.gz"}
    _save_nifti(image, affine, root / out["image"])
    present: list[int] = []
    if split == 0:
        out["label"] = f"./labelsTr/{case_id}.nii.gz"
        _save_nifti(label, affine, root / out["label"])
        voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
        out["volumes"], out["mean_hu"] = {}, {}
        for k in classes:
            mask = label == k
            out["volumes"][k] = float(mask.sum()) * voxel_ml
            out["mean_hu"][k] = float(image[mask].mean()) if mask.any() else None
        present = sorted(int(v) for v in np.unique(label) if v)
    if keep_arrays:
        out["preview"] = (case_id, image, label if split == 0 else None, affine)
    out["line"] = (f"{case_id}: {size[0]}x{size[1]}x{size[2]} voxels, HU [{int(image.min())}, {int(image.max())}], "
                   f"organs {len(present)}/{len(classes)}, {seconds:.2f} s")
    return out


def _map_cases(jobs: list[tuple], workers: int) -> Iterator[dict]:
    """``_write_case`` over ``jobs`` in order, in ``workers`` processes (spawned: the caller may hold thread pools or
    OpenVINO, which a fork would copy in a broken state)."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if workers <= 1 or len(jobs) < 2 or (main_file is not None and not Path(main_file).is_file()):
        # (a program read from standard input cannot be re-imported by spawned workers)
        yield from map(_write_case, jobs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(int(workers), len(jobs)),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(_write_case, jobs)


def write_dataset(root: str | Path, cases: int, test_cases: int = 0, seed: int = 0,
                  size: Sequence[int] = DEFAULT_SIZE, preview: bool = False, *, label_gallbladder: bool = False,
                  verbose: bool = False, spacing_mm: Sequence[float] | None = None, workers: int = 1) -> Path:
    """Write an MSD-layout phantom dataset (imagesTr, labelsTr, imagesTs, dataset.json) under ``root``.

    Args:
        root: output folder (created if needed).
        cases: number of labelled training cases (>= 1).
        test_cases: number of unlabelled cases in imagesTs.
        seed: dataset seed; case i of a split is generated from (seed, split, i).
        size: voxel counts (X, Y, Z) of every case.
        preview: also write preview.png, a contact sheet of slices with label overlays.
        label_gallbladder: label the gallbladder as class 8.
        verbose: print one line per case and summary statistics.
        spacing_mm: voxel spacing (field of view ``size × spacing_mm``); ``None``: the default field of view.
        workers: processes generating cases (each case has its own random stream, so the files do not depend on it).

    Returns:
        The dataset root.
    """
    if int(cases) < 1 or int(test_cases) < 0:
        raise PhantomError(f"need cases >= 1 and test_cases >= 0, got cases={cases}, test_cases={test_cases}")
    size = validate_size(size)
    fov = field_of_view(size, spacing_mm)
    root = Path(root)
    labels = dataset_labels(label_gallbladder)
    jobs = [(split, i, int(seed), size, bool(label_gallbladder), spacing_mm, str(root),
             tuple(k for k in labels if k), bool(preview) and n < 6)
            for n, (split, i) in enumerate([(0, i) for i in range(int(cases))] + [(1, i) for i in range(int(test_cases))])]
    training, test, previews = [], [], []
    volumes = {k: [] for k in labels if k}
    mean_hu = {k: [] for k in labels if k}
    for case in _map_cases(jobs, workers):
        if case["split"] == 0:
            training.append({"image": case["image"], "label": case["label"]})
            for k in volumes:
                volumes[k].append(case["volumes"][k])
                if case["mean_hu"][k] is not None:
                    mean_hu[k].append(case["mean_hu"][k])
        else:
            test.append(case["image"])
        if case.get("preview") is not None:
            previews.append(case["preview"])
        if verbose:
            print(case["line"], flush=True)
    info = {
        "name": "Phantom",
        "description": "Synthetic contrast-enhanced abdominal CT phantoms (sam3d-distill data.phantom)",
        "reference": "generated", "licence": "CC0", "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in labels.items()},
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
        # Lets a pipeline tell whether an existing phantom dataset matches the one it would generate.
        "generator": {"name": "data.phantom", "version": PHANTOM_VERSION, "seed": int(seed), "cases": int(cases),
                      "test_cases": int(test_cases), "size": list(size), "label_gallbladder": bool(label_gallbladder),
                      "field_of_view_mm": [round(f, 4) for f in fov]},
    }
    write_json_atomic(root / "dataset.json", info)
    if preview and previews:
        render_preview(previews, labels, root / "preview.png")
    if verbose:
        print(f"wrote {len(training)} training + {len(test)} test cases to {root}")
        print(f"{'class':<14}{'volume ml (mean ± sd)':>24}{'mean HU':>10}")
        for k, name in labels.items():
            if k:
                v = np.asarray(volumes[k])
                hu = f"{np.mean(mean_hu[k]):.0f}" if mean_hu[k] else "-"
                print(f"{name:<14}{v.mean():>14.1f} ± {v.std():<7.1f}{hu:>10}")
    return root


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.phantom", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="dataset folder to write")
    parser.add_argument("--cases", type=int, default=16, help="labelled training cases")
    parser.add_argument("--test-cases", type=int, default=0, help="unlabelled cases (imagesTs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, nargs=3, default=list(DEFAULT_SIZE), metavar=("X", "Y", "Z"))
    parser.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("SX", "SY", "SZ"),
                        help="voxel spacing in mm (field of view = size x spacing, anatomy at its usual size), "
                             "e.g. --size 512 512 200 --spacing 0.8 0.8 2.5 for a clinical-size CT")
    parser.add_argument("--preview", action="store_true", help="write preview.png")
    parser.add_argument("--gallbladder", action="store_true", help="label the gallbladder as class 8")
    args = parser.parse_args(argv)
    try:
        write_dataset(args.out, args.cases, args.test_cases, args.seed, args.size, args.preview,
                      label_gallbladder=args.gallbladder, verbose=True, spacing_mm=args.spacing)
    except PhantomError as exc:
        parser.error(str(exc))
    return 0
