"""Where the time of one deployed segmentation goes, step by step, and which settings win here.

    python -m benchmarks.deploy_profile --bundle B [--volume ct.nii.gz] [--runtime openvino] [--threads 2]
    python -m benchmarks.deploy_profile --bundle B --sweep     # runtime × precision × overlap × window batch

``profile_segment_file`` runs the steps of ``deploy.Segmenter.segment_file`` one at a time through the same
deploy functions, with a clock around each: load, reorient + resample, body crop, intensity, the sliding
window split into model calls and the numpy work around them (window gathering and Gaussian blending),
paste back into the full grid, resampling back to the input grid (with the argmax and the orientation
undone), save.
Its mask is checked to equal ``segment_file``'s own, so the steps timed are the steps deployed.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

STEPS = ("load", "reorient_resample", "body_crop", "intensity", "model_calls", "window_blend", "paste",
         "postprocess", "resample_back", "save")


class ProfileError(ValueError):
    """A profile that cannot be made (no bundle, unreadable volume, a step disagreeing with segment_file)."""


@dataclass(frozen=True)
class StepProfile:
    """Median wall time of each step and of the real ``segment_file`` over the repeats.

    Attributes:
        steps_ms: step name → median ms (``STEPS`` order).
        total_ms: median of the summed steps.
        segment_file_ms: median wall time of ``Segmenter.segment_file`` itself (the deployed call).
        windows: sliding-window positions per volume; model_calls: predictor calls per volume.
        model_grid: ``[X, Y, Z]`` after resampling; window_grid: the part the windows cover (body box).
        settings: runtime, precision, threads, overlap, batch_size, resample_back.
    """

    steps_ms: dict[str, float]
    total_ms: float
    segment_file_ms: float
    windows: int
    model_calls: int
    model_grid: list[int]
    window_grid: list[int]
    settings: dict[str, Any]

    def table(self) -> str:
        """Markdown table: step, ms, share of the summed steps."""
        lines = ["| step | ms | share |", "|---|---|---|"]
        for name, ms in self.steps_ms.items():
            lines.append(f"| {name} | {ms:.1f} | {100.0 * ms / self.total_ms:.1f} % |")
        lines.append(f"| **sum of steps** | {self.total_ms:.1f} | 100 % |")
        lines.append(f"| `segment_file` (deployed call) | {self.segment_file_ms:.1f} | |")
        return "\n".join(lines)


class _TimedPredictor:
    """Wraps a ``ModelSession``: counts calls and sums their wall time."""

    def __init__(self, session: Any) -> None:
        self.session, self.seconds, self.calls = session, 0.0, 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        out = self.session(batch)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def _one_pass(segmenter: Any, in_path: Path, out_path: Path) -> tuple[dict[str, float], np.ndarray, dict]:
    """One segmentation, step by step (deploy's own functions, in ``segment_file``'s order)."""
    from deploy.body_crop import body_box, paste_logits
    from deploy.geometry import labels_to_source, logits_to_source, to_model_grid
    from deploy.intensity import apply_intensity
    from deploy.sliding_window import sliding_window_logits
    from deploy.volume_io import label_dtype, read_volume, write_mask

    ms: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        ms[name] = ms.get(name, 0.0) + (now - clock) * 1000.0
        clock = now

    image, affine, reference = read_volume(in_path)
    lap("load")
    resampled, geometry = to_model_grid(image, affine, segmenter.spacing_mm, segmenter.axcodes)
    lap("reorient_resample")
    box = body_box(resampled, *segmenter.crop) if segmenter.crop else tuple(slice(0, s) for s in resampled.shape)
    lap("body_crop")
    model_input = apply_intensity(resampled[box], segmenter.intensity)[None]
    lap("intensity")
    predictor = _TimedPredictor(segmenter.session)
    logits = sliding_window_logits(model_input, predictor, segmenter.roi_size, segmenter.num_classes,
                                   segmenter.overlap, segmenter.batch_size)
    lap("window_blend")
    ms["model_calls"] = predictor.seconds * 1000.0
    ms["window_blend"] -= ms["model_calls"]
    if segmenter.crop:
        logits = paste_logits(logits, box, resampled.shape)
    lap("paste")
    logits = segmenter.postprocess(logits)
    lap("postprocess")
    if segmenter.resample_back == "labels":
        labels = labels_to_source(np.argmax(logits, axis=0).astype(label_dtype(segmenter.num_classes)),
                                  geometry)
    else:
        labels = logits_to_source(logits, geometry)
    lap("resample_back")
    write_mask(out_path, labels, reference, segmenter.num_classes)
    lap("save")
    info = {"model_calls": predictor.calls, "model_grid": list(resampled.shape),
            "window_grid": list(model_input.shape[1:])}
    return ms, labels, info


def profile_segment_file(segmenter: Any, in_path: str | Path, repeats: int = 3, warmup: int = 1) -> StepProfile:
    """Median time of every step of ``segmenter.segment_file(in_path, ...)``, and of the call itself.

    Args:
        segmenter: a ``deploy.Segmenter``.
        in_path: CT NIfTI.
        repeats: timed passes (medians reported); each pass times the steps, then ``segment_file``.
        warmup: untimed passes first (runtime kernel selection, caches).

    Returns:
        the profile; raises ``ProfileError`` if the step-by-step mask differs from ``segment_file``'s.
    """
    from benchmarks.volume import sliding_window_count

    if repeats < 1 or warmup < 0:
        raise ProfileError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    in_path = Path(in_path)
    if not in_path.is_file():
        raise ProfileError(f"{in_path}: volume not found")
    runs: list[dict[str, float]] = []
    deployed: list[float] = []
    with tempfile.TemporaryDirectory(prefix="deploy_profile_") as tmp:
        out_steps, out_real = Path(tmp) / "steps.nii.gz", Path(tmp) / "real.nii.gz"
        for i in range(warmup + repeats):
            ms, labels, info = _one_pass(segmenter, in_path, out_steps)
            start = time.perf_counter()
            real = segmenter.segment_file(in_path, out_real)
            real_ms = (time.perf_counter() - start) * 1000.0
            if i == 0 and not np.array_equal(labels, real):
                raise ProfileError(f"{in_path}: the step-by-step mask differs from Segmenter.segment_file's "
                                   f"({int((labels != real).sum())} voxels); the profile would time other steps")
            if i >= warmup:
                runs.append(ms)
                deployed.append(real_ms)
    steps = {name: float(np.median([r.get(name, 0.0) for r in runs])) for name in STEPS}
    windows = sliding_window_count([max(s, r) for s, r in zip(info["window_grid"], segmenter.roi_size)],
                                   segmenter.roi_size, segmenter.overlap)
    return StepProfile(
        steps_ms=steps, total_ms=float(np.median([sum(r.values()) for r in runs])),
        segment_file_ms=float(np.median(deployed)), windows=windows, model_calls=info["model_calls"],
        model_grid=info["model_grid"], window_grid=info["window_grid"],
        settings={"runtime": segmenter.session.runtime, "precision": segmenter.session.precision,
                  "threads": getattr(segmenter, "threads", None), "overlap": segmenter.overlap,
                  "batch_size": segmenter.batch_size, "resample_back": segmenter.resample_back},
    )


def sweep_settings(bundle_dir: str | Path, in_path: str | Path, runtimes: Sequence[str], precisions: Sequence[str],
                   threads: Sequence[int], overlaps: Sequence[float], batch_sizes: Sequence[int], repeats: int = 3,
                   progress: bool = True) -> list[dict[str, Any]]:
    """``segment_file`` wall time (median of ``repeats`` after one warm-up) for every combination of settings.

    Combinations the bundle or CPU cannot run (no INT8 model, no native bf16) are skipped. The runs are
    interleaved round-robin over the combinations, so a busy spell of a shared machine hits all of them.

    Args:
        bundle_dir: deploy bundle.
        in_path: CT NIfTI.
        runtimes, precisions, threads, overlaps, batch_sizes: the settings to combine.
        repeats: timed calls per combination.
        progress: print one line per combination.

    Returns:
        rows ``{"runtime", "precision", "threads", "overlap", "batch_size", "p50_ms", "min_ms", "samples_ms"}``
        sorted by p50.
    """
    from deploy import RuntimeChoiceError, Segmenter

    combos = []
    for runtime, precision, t, overlap, batch in itertools.product(runtimes, precisions, threads, overlaps, batch_sizes):
        try:
            seg = Segmenter(bundle_dir, runtime, precision, threads=int(t), overlap=float(overlap), batch_size=int(batch))
        except RuntimeChoiceError:
            continue
        combos.append(({"runtime": runtime, "precision": precision, "threads": int(t), "overlap": float(overlap),
                        "batch_size": int(batch)}, seg, []))
    if not combos:
        raise ProfileError(f"{bundle_dir}: none of the requested settings can run here")
    with tempfile.TemporaryDirectory(prefix="deploy_sweep_") as tmp:
        out = Path(tmp) / "mask.nii.gz"
        for _, seg, _ in combos:
            seg.segment_file(in_path, out)  # warm-up
        for _ in range(repeats):
            for _, seg, samples in combos:
                start = time.perf_counter()
                seg.segment_file(in_path, out)
                samples.append((time.perf_counter() - start) * 1000.0)
    rows = [{**settings, "p50_ms": float(np.median(s)), "min_ms": float(np.min(s)), "samples_ms": s}
            for settings, _, s in combos]
    rows.sort(key=lambda r: r["p50_ms"])
    if progress:
        for r in rows:
            print(f"[sweep] {r['runtime']} {r['precision']} t{r['threads']} overlap {r['overlap']} "
                  f"batch {r['batch_size']}: p50 {r['p50_ms']:.0f} ms (min {r['min_ms']:.0f})")
    return rows


def _phantom_volume(tmp: Path, size: Sequence[int]) -> Path:
    from data.phantom_dataset import write_dataset

    root = write_dataset(tmp / "volume", cases=1, test_cases=0, seed=0, size=tuple(size))
    return sorted(Path(root).glob("imagesTr/*.nii*"))[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.deploy_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, help="deploy bundle folder")
    parser.add_argument("--volume", help="CT NIfTI (default: a 96x96x48 phantom)")
    parser.add_argument("--runtime", default="openvino")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", default="2", help="thread count (comma-separated for --sweep)")
    parser.add_argument("--overlap", default=None, help="window overlap (comma-separated for --sweep)")
    parser.add_argument("--batch-size", default=None, help="windows per model call (comma-separated for --sweep)")
    parser.add_argument("--resample-back", default="logits", choices=("logits", "labels"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sweep", action="store_true", help="time segment_file over combinations of settings")
    args = parser.parse_args(argv)
    from deploy import DeployError, Segmenter

    def floats(text: str | None, default: list) -> list:
        return default if text is None else [float(v) for v in text.split(",") if v.strip()]

    try:
        with tempfile.TemporaryDirectory(prefix="deploy_profile_vol_") as tmp:
            volume = Path(args.volume) if args.volume else _phantom_volume(Path(tmp), (96, 96, 48))
            if args.sweep:
                sweep_settings(args.bundle, volume, args.runtime.split(","), args.precision.split(","),
                               [int(t) for t in args.threads.split(",")], floats(args.overlap, [0.25]),
                               [int(b) for b in floats(args.batch_size, [1])], repeats=args.repeats)
                return 0
            seg = Segmenter(args.bundle, args.runtime, args.precision, threads=int(args.threads),
                            overlap=None if args.overlap is None else float(args.overlap),
                            batch_size=None if args.batch_size is None else int(args.batch_size),
                            resample_back=args.resample_back)
            profile = profile_segment_file(seg, volume, repeats=args.repeats)
    except (DeployError, ProfileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{volume}: model grid {profile.model_grid}, windows over {profile.window_grid}: {profile.windows} "
          f"windows in {profile.model_calls} model calls; settings {profile.settings}")
    print(profile.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
