"""Interactive-mode evaluation of the teacher: simulated clicks, Dice and NSD after 1, 3, 5, 10 clicks.

    python -m teacher.clicks --teacher runs/demo/teacher/teacher.pt --data runs/demo [--clicks 1,3,5,10]

For every validation case and foreground class, ``evaluation.clicks.click_protocol`` places the clicks
(first at the organ's deepest voxel, then at the largest error) and this module answers them with the
teacher: one ROI crop is fixed around the first click (clamped into the volume, zero-padded where the
volume is smaller), every click inside it is passed as a point prompt, and the mask of the clicked class is
``argmax == class`` on that crop (the point-prompt training target, see ``teacher.point_sampling``);
voxels outside the crop are background. Two modes:

- ``points``: clicks only (``use_auto_prompt=False``), the mode point-prompt training teaches;
- ``auto+points``: the automatic prompt as well, clicks added on top.

A SAM-Med3D teacher (``teacher.backbone: sam_med3d``) answers ``points`` with its own interactive path
(``teacher.sam_med3d.interactive.SamMed3DClickSegmenter``): a binary mask of the clicked organ, the window
centred on the first click, and from the second click on the previous low-resolution logits fed back as
mask prompt, as in the SAM-Med3D paper. Its ``auto+points`` mode is the K-class path above.

Scores are those after each requested click count and the normalised area under the Dice curve, never
the best over clicks. ``--data`` is a run folder (its validation split, ``data/data.json``) or a dataset
folder (MSD / nnU-Net raw: all its labelled cases).
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from configs.schema import EvaluationConfig
from data.atomic import atomic_path

MODES = {"points": False, "auto+points": True}  # mode -> use_auto_prompt
DEFAULT_CLICKS = (1, 3, 5, 10)


class ClickEvalError(ValueError):
    """Bad arguments or data for the click evaluation; the message names the value or file."""


class ClickSegmenter:
    """``segment_fn`` for ``click_protocol``: the teacher on one ROI crop fixed around the first click.

    Args:
        model: the teacher (eval mode), on ``device``.
        class_id: the clicked class; the returned mask is ``argmax == class_id``.
        roi_size: crop ``[X, Y, Z]`` the teacher accepts.
        use_auto_prompt: add the automatic prompt to the clicks.
        device: where the teacher runs.
    """

    def __init__(self, model: torch.nn.Module, class_id: int, roi_size: Sequence[int], use_auto_prompt: bool,
                 device: str | torch.device = "cpu") -> None:
        self.model = model
        self.class_id = int(class_id)
        self.roi = np.asarray([int(s) for s in roi_size])
        self.use_auto_prompt = bool(use_auto_prompt)
        self.device = torch.device(device)
        self.start: np.ndarray | None = None

    def __call__(self, image: Any, coords: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Segment the clicked class.

        Args:
            image: preprocessed volume ``1 x X x Y x Z`` (numpy or torch).
            coords: ``N x 3`` voxel coordinates of the clicks so far (x, y, z).
            labels: ``N`` click labels (1 positive, 0 negative).

        Returns:
            binary mask ``X x Y x Z`` (bool).
        """
        if hasattr(image, "as_tensor"):  # a MONAI MetaTensor: the plain tensor, without its metadata
            image = image.as_tensor()
        volume = torch.as_tensor(image).float()
        shape = np.asarray(volume.shape[1:])
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 3)
        if self.start is None:
            self.start = np.clip(coords[0] - self.roi // 2, 0, np.maximum(shape - self.roi, 0))
        stop = np.minimum(self.start + self.roi, shape)
        crop = volume[:, self.start[0]:stop[0], self.start[1]:stop[1], self.start[2]:stop[2]]
        pad = self.roi - (stop - self.start)
        crop = torch.nn.functional.pad(crop, (0, int(pad[2]), 0, int(pad[1]), 0, int(pad[0])))
        inside = np.all((coords >= self.start) & (coords < stop), axis=1)
        local = torch.as_tensor(coords[inside] - self.start, dtype=torch.float32)[None]
        marks = torch.as_tensor(np.asarray(labels)[inside], dtype=torch.long)[None]
        with torch.inference_mode():
            logits = self.model(crop[None].to(self.device), points=(local, marks), use_auto_prompt=self.use_auto_prompt)
        crop_mask = (logits[0].argmax(0) == self.class_id).cpu().numpy()
        mask = np.zeros(tuple(shape), dtype=bool)
        size = stop - self.start
        mask[self.start[0]:stop[0], self.start[1]:stop[1], self.start[2]:stop[2]] = crop_mask[:size[0], :size[1], :size[2]]
        return mask


def click_segmenter(model: torch.nn.Module, class_id: int, roi_size: Sequence[int], mode: str,
                    device: str | torch.device = "cpu") -> Any:
    """The ``segment_fn`` that answers one target's clicks in ``mode`` (a fresh one per target).

    Args:
        model: the teacher (eval mode), on ``device``.
        class_id: the clicked class.
        roi_size: crop ``[X, Y, Z]`` the teacher accepts.
        mode: a key of :data:`MODES`.
        device: where the teacher runs.
    """
    from teacher.sam_med3d.auto_teacher import SamMed3DAutoTeacher

    if mode == "points" and isinstance(model, SamMed3DAutoTeacher):
        from teacher.sam_med3d.interactive import SamMed3DClickSegmenter, SamMed3DTeacher

        if [int(s) for s in roi_size] != [model.sam.img_size] * 3:
            raise ClickEvalError(f"roi_size {list(roi_size)}: this SAM-Med3D teacher takes {model.sam.img_size}³ crops")
        return SamMed3DClickSegmenter(SamMed3DTeacher(model.sam))
    return ClickSegmenter(model, class_id, roi_size, MODES[mode], device)


def evaluate_clicks(
    model: torch.nn.Module,
    cases: Sequence[Mapping[str, Any]],
    labels: Mapping[int, str],
    spacing_mm: Sequence[float],
    roi_size: Sequence[int],
    n_clicks: Sequence[int] = DEFAULT_CLICKS,
    modes: Sequence[str] = ("points",),
    nsd_tolerance_mm: float = 2.0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run the click protocol for every case, foreground class present in it, and mode.

    Args:
        model: the teacher, on ``device``.
        cases: preprocessed cases ``{"image": 1 x X x Y x Z, "label": 1 x X x Y x Z, "case_id"?}``.
        labels: ``{class id: name}`` including background.
        spacing_mm: voxel spacing of the preprocessed volumes.
        roi_size: the teacher's crop.
        n_clicks: click counts to report.
        modes: keys of :data:`MODES`.
        nsd_tolerance_mm: NSD tolerance.
        device: where the teacher runs.
        progress: print a line per case.

    Returns:
        One row per (case, class, mode): ``{"case_id", "class_id", "class_name", "mode", "dice": {n: v},
        "nsd": {n: v}, "dice_auc"}``.
    """
    from evaluation.clicks import click_protocol

    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ClickEvalError(f"modes must be some of {sorted(MODES)}, got {list(modes)}")
    was_training = model.training
    model.eval()
    rows = []
    try:
        for i, case in enumerate(cases):
            image = torch.as_tensor(np.asarray(case["image"], dtype=np.float32))
            label = np.asarray(case["label"])[0].astype(np.int64)
            case_id = str(case.get("case_id", i))
            for class_id in sorted(int(c) for c in labels if int(c) > 0):
                target = label == class_id
                if not target.any():
                    continue
                for mode in modes:
                    segmenter = click_segmenter(model, class_id, roi_size, mode, device)
                    out = click_protocol(segmenter, image, target, spacing_mm, n_clicks, nsd_tolerance_mm)
                    rows.append({"case_id": case_id, "class_id": class_id, "class_name": labels[class_id], "mode": mode,
                                 "dice": out["dice"], "nsd": out["nsd"], "dice_auc": out["dice_auc"]})
            if progress:
                print(f"[clicks] {case_id}: done ({i + 1}/{len(cases)})", flush=True)
    finally:
        model.train(was_training)
    return rows


def summarize_clicks(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean over cases per class and mode, and the mean over classes.

    Args:
        rows: from :func:`evaluate_clicks`.

    Returns:
        ``{"per_class": {class_id: {mode: {"name", "dice": {n: v}, "nsd": {n: v}, "dice_auc"}}},
        "mean": {mode: {"dice": {n: v}, "nsd": {n: v}, "dice_auc"}}}``; NaN scores (empty prediction and
        target cannot occur here, but a class absent everywhere can) are left out of the means.
    """
    if not rows:
        raise ClickEvalError("no click results to summarise (no validation case has a foreground class)")
    counts = sorted({int(n) for r in rows for n in r["dice"]})
    per_class: dict[int, dict[str, Any]] = {}
    for class_id in sorted({int(r["class_id"]) for r in rows}):
        per_class[class_id] = {}
        for mode in sorted({r["mode"] for r in rows}):
            sel = [r for r in rows if int(r["class_id"]) == class_id and r["mode"] == mode]
            if not sel:
                continue
            per_class[class_id][mode] = {
                "name": sel[0]["class_name"],
                "dice": {n: _nanmean([r["dice"][n] for r in sel]) for n in counts},
                "nsd": {n: _nanmean([r["nsd"][n] for r in sel]) for n in counts},
                "dice_auc": _nanmean([r["dice_auc"] for r in sel]),
            }
    mean: dict[str, Any] = {}
    for mode in sorted({r["mode"] for r in rows}):
        entries = [v[mode] for v in per_class.values() if mode in v]
        mean[mode] = {
            "dice": {n: _nanmean([e["dice"][n] for e in entries]) for n in counts},
            "nsd": {n: _nanmean([e["nsd"][n] for e in entries]) for n in counts},
            "dice_auc": _nanmean([e["dice_auc"] for e in entries]),
        }
    return {"per_class": per_class, "mean": mean}


def _nanmean(values: Sequence[float]) -> float:
    finite = [float(v) for v in values if not math.isnan(float(v))]
    return float(np.mean(finite)) if finite else math.nan


def write_click_csv(summary: Mapping[str, Any], path: str | Path) -> Path:
    """Write the summary as CSV (atomic): one row per class and mode, then the means (``class_id`` "mean").

    Args:
        summary: from :func:`summarize_clicks`.
        path: destination ``.csv``.
    """
    counts = sorted(next(iter(summary["mean"].values()))["dice"])
    header = ["class_id", "class_name", "mode", *[f"dice@{n}" for n in counts], *[f"nsd@{n}" for n in counts], "dice_auc"]
    lines = []
    for class_id, modes in summary["per_class"].items():
        for mode, e in modes.items():
            lines.append([class_id, e["name"], mode, *[e["dice"][n] for n in counts], *[e["nsd"][n] for n in counts], e["dice_auc"]])
    for mode, e in summary["mean"].items():
        lines.append(["mean", "mean", mode, *[e["dice"][n] for n in counts], *[e["nsd"][n] for n in counts], e["dice_auc"]])
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows([[f"{v:.4f}" if isinstance(v, float) else v for v in line] for line in lines])
    return Path(path)


def format_click_table(summary: Mapping[str, Any]) -> str:
    """A fixed-width text table of :func:`summarize_clicks` (Dice / NSD at each click count, AUC)."""
    counts = sorted(next(iter(summary["mean"].values()))["dice"])
    head = f"{'class':<14} {'mode':<12} " + " ".join(f"{'D@' + str(n):>6}" for n in counts) + " " + \
        " ".join(f"{'NSD@' + str(n):>7}" for n in counts) + f" {'AUC':>6}"
    lines = [head, "-" * len(head)]
    entries = [(e["name"], mode, e) for modes in summary["per_class"].values() for mode, e in modes.items()]
    entries += [("mean", mode, e) for mode, e in summary["mean"].items()]
    for name, mode, e in entries:
        lines.append(f"{name:<14} {mode:<12} " + " ".join(f"{e['dice'][n]:6.3f}" for n in counts) + " " +
                     " ".join(f"{e['nsd'][n]:7.3f}" for n in counts) + f" {e['dice_auc']:6.3f}")
    return "\n".join(lines)


def load_cases(data: str | Path, spec: dict, max_cases: int | None = None) -> tuple[list[dict], str]:
    """Preprocessed labelled cases from a run folder (validation split) or a dataset folder (all labelled).

    Args:
        data: run folder holding ``data/data.json``, or an MSD / nnU-Net raw dataset folder.
        spec: the teacher's preprocessing spec.
        max_cases: keep at most this many cases.

    Returns:
        ``(cases, description)``.
    """
    from data.transforms import load_transforms

    root = Path(data)
    artifact = root / "data" / "data.json"
    if artifact.is_file():
        from data.prepare import PreparedData

        split, items = PreparedData.load(artifact).scoring_split()
        what = f"{'test' if split == 'test' else 'validation (no test split)'} cases of {root}"
    elif root.is_dir():
        from data.dataset import load_dataset

        dataset = load_dataset(root)
        items = [{"case_id": c["case_id"], "image": c["image"], "label": c["label"]} for c in dataset.training]
        what = f"labelled cases of {root}"
    else:
        raise ClickEvalError(f"--data {data}: neither a run folder (data/data.json) nor a dataset folder")
    if not items:
        raise ClickEvalError(f"--data {data}: no labelled case to evaluate")
    items = list(items)[:max_cases] if max_cases else list(items)
    transform = load_transforms(spec, keys=("image", "label"))
    return [{**transform({"image": it["image"], "label": it["label"]}), "case_id": it["case_id"]} for it in items], what


def parse_clicks(text: str) -> tuple[int, ...]:
    """``"1,3,5,10"`` -> ``(1, 3, 5, 10)``; refuses anything but positive integers."""
    try:
        counts = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError as exc:
        raise ClickEvalError(f"--clicks {text!r}: expected comma-separated positive integers") from exc
    if not counts or counts[0] < 1:
        raise ClickEvalError(f"--clicks {text!r}: expected comma-separated positive integers")
    return counts


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line: evaluate a ``teacher.pt`` with simulated clicks, print the table, write a CSV."""
    from teacher.checkpoint import load_teacher

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="teacher.pt")
    parser.add_argument("--data", required=True, help="run folder (validation split) or dataset folder")
    parser.add_argument("--clicks", default="1,3,5,10", help="click counts to report")
    parser.add_argument("--modes", default="points,auto+points", help=f"comma-separated, of {sorted(MODES)}")
    parser.add_argument("--nsd-tolerance", type=float, default=None, help="mm (default: the config's evaluation.nsd_tolerance_mm)")
    parser.add_argument("--max-cases", type=int, default=None)
    parser.add_argument("--out", default=None, help="CSV path (default: clicks.csv beside the teacher)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    counts = parse_clicks(args.clicks)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    model, meta = load_teacher(args.teacher, device=args.device)
    tolerance = args.nsd_tolerance
    if tolerance is None:
        tolerance = float((meta.get("config") or {}).get("evaluation", {}).get("nsd_tolerance_mm", EvaluationConfig.nsd_tolerance_mm))
    cases, what = load_cases(args.data, meta["preprocess"], args.max_cases)
    labels = {int(k): v for k, v in meta["labels"].items()}
    print(f"[clicks] {len(cases)} {what}; clicks {list(counts)}; modes {modes}; NSD tolerance {tolerance} mm")
    rows = evaluate_clicks(model, cases, labels, meta["preprocess"]["spacing_mm"], meta["roi_size"], counts, modes,
                           tolerance, device=args.device)
    summary = summarize_clicks(rows)
    out = Path(args.out) if args.out else Path(args.teacher).with_name("clicks.csv")
    write_click_csv(summary, out)
    print(format_click_table(summary))
    print(f"[clicks] wrote {out}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
