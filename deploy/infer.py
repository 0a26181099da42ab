"""Command line of the edge runtime::

    python -m deploy.infer --bundle BUNDLE --input ct.nii.gz --output mask.nii.gz \
        [--runtime auto|openvino|onnxruntime] [--precision auto|fp32|bf16|int8] [--threads N] [--overlap F] \
        [--overlay out.png] [--report result.json] [--force] [--no-cache]

``auto`` (the default of both): the fastest model the bundle offers whose recorded Dice is within the
export's bound of FP32, measured on this machine once and cached (``deploy.autoselect``); the choice and
its figures are printed. Compiled OpenVINO models are cached per machine too (``deploy.machine``), so a
second run loads instead of compiling; ``--no-cache`` measures and compiles afresh and writes nothing.

Every input is checked first (deploy.plausibility): a volume that does not look like the CT the model was
trained for (not in HU, no body, far too small for the model's window) is refused with exit code 2 and no
mask; ``--force`` segments it anyway. Warnings (and forced refusals) are printed to stderr, named in the
summary line, and written to the ``--report`` JSON, which is written on a refusal too.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import asdict
from typing import Any, Sequence

from deploy.errors import DeployError, ImplausibleInputError, ImplausibleInputWarning
from deploy.runtime import PRECISIONS, RUNTIMES
from deploy.segmenter import Segmenter
from deploy.volume_io import write_json_report


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (Linux ``VmHWM``), in MiB; ``None`` where /proc is absent."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.infer", description="Segment a CT NIfTI with a deploy bundle.")
    parser.add_argument("--bundle", required=True, help="bundle folder (model.json + model files)")
    parser.add_argument("--input", required=True, help="CT volume (.nii / .nii.gz)")
    parser.add_argument("--output", required=True, help="label mask to write (.nii / .nii.gz)")
    parser.add_argument("--runtime", choices=("auto", *RUNTIMES), default="auto",
                        help="auto (default): the fastest qualifying one on this machine, measured once and cached")
    parser.add_argument("--precision", choices=("auto", *PRECISIONS), default="auto",
                        help="auto (default): the fastest whose recorded Dice is within the bundle's bound of FP32")
    parser.add_argument("--no-cache", action="store_true",
                        help="do not read or write the per-machine cache (compiled models, the auto choice)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--overlap", type=float, default=None, help="window overlap (default: the bundle's)")
    parser.add_argument("--overlay", default=None, help="optional PNG of a few axial slices with the mask")
    parser.add_argument("--report", default=None,
                        help="JSON file with the input checks (verdict, findings, statistics), warnings and the result; "
                             "written also when the input is refused")
    parser.add_argument("--force", action="store_true",
                        help="segment a volume the input checks refuse (not HU, no body, too small for the model), "
                             "with a warning: for an unusual but real CT")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"input": args.input, "output": args.output, "bundle": args.bundle, "runtime": args.runtime,
                              "precision": args.precision, "forced": bool(args.force), "status": "error", "error": None,
                              "input_check": None, "warnings": []}

    def finish(code: int) -> int:
        if args.report:
            write_json_report(args.report, report)
        return code

    try:
        start = time.perf_counter()
        segmenter = Segmenter(args.bundle, args.runtime, args.precision, args.threads, args.overlap,
                              compile_cache=not args.no_cache)
        loaded = time.perf_counter()
        report.update(runtime=segmenter.runtime, precision=segmenter.precision)
        if segmenter.choice is not None:
            print(segmenter.choice.summary())
            report["choice"] = asdict(segmenter.choice)
        with warnings.catch_warnings():
            # reported below from the assessment, once, to stderr and the report
            warnings.simplefilter("ignore", ImplausibleInputWarning)
            labels = segmenter.segment_file(args.input, args.output, overlay=args.overlay, force=args.force)
        done = time.perf_counter()
    except ImplausibleInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        report.update(status="refused", error=str(exc),
                      input_check=exc.assessment.as_dict() if exc.assessment is not None else None)
        return finish(2)
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        report["error"] = str(exc)
        return finish(2)
    check = segmenter.last_check
    messages = check.warning_messages() if check is not None else []
    for message in messages:
        print(f"warning: {message}", file=sys.stderr)
    counts = {segmenter.labels.get(int(c), str(c)): int((labels == c).sum()) for c in range(1, segmenter.num_classes)}
    verdict = check.verdict if check is not None else "not checked"
    codes = sorted({f.code for f in check.findings}) if check is not None else []
    report.update(status="segmented", input_check=check.as_dict() if check is not None else None, warnings=messages,
                  shape=list(labels.shape), voxels_per_class=counts, windows=segmenter.last_windows,
                  seconds={"load": round(loaded - start, 3), "segment": round(done - loaded, 3)},
                  peak_rss_mb=peak_rss_mb())
    print(f"{args.output}: shape {labels.shape}, {segmenter.runtime}/{segmenter.precision}, "
          f"load {loaded - start:.2f}s, segment {done - loaded:.2f}s; voxels per class {counts}; "
          f"input check: {verdict}{' (' + ', '.join(codes) + ')' if codes else ''}")
    return finish(0)


if __name__ == "__main__":
    sys.exit(main())
