"""Seconds and % of the GEMM peak of one student (or teacher) *training* step, per setting, measured in one run.

    python -m benchmarks.train_step [--student swinunetr_tiny] [--roi 64 64 32] [--batch 1] [--steps 6]
                                    [--settings window7 window4 window8 compile channels_last bf16 fused_attention slab_conv]
                                    [--threads 2] [--out runs/train_step]
    python -m benchmarks.train_step --teacher [--config configs/demo.yaml] --settings base channels_last bf16

``--teacher`` times the teacher a config's ``teacher:`` section builds (without a SAM checkpoint every weight
trains, as in the demo), at that section's ROI and batch unless ``--roi`` / ``--batch`` say otherwise, on DiceCE
(what a teacher step computes). Its FLOPs are not counted (no % of peak).

A distillation run is thousands of these steps, so on a CPU the step is the budget. Each setting builds the
student afresh (seeded), runs AdamW on DiceCE + MSE to a fixed target (what a KD step computes), discards
``--warmup`` steps and reports the median of ``--steps`` timed ones. FLOPs are the forward count of
``student.describe`` times 3 (forward + backward ≈ 3 forwards); the fp32 GEMM peak is measured in the same
process with the same threads, so "% of peak" reads against this machine, whatever its instruction sets
(printed with the table). Settings are interleaved round-robin over ``--rounds`` so that a slow spell of a
shared machine does not land on one setting only.

Settings: ``base`` (nothing changed), ``windowN`` (attention window N³; the baseline is the first setting), ``compile``
(``torch.compile`` of the first window setting), ``channels_last`` (``torch.channels_last_3d`` input and
weights), ``bf16`` (CPU bf16 autocast; skipped where the CPU has no native bf16), ``batchB`` (batch B),
``fused_attention`` (window attention as one ``scaled_dot_product_attention`` call, forward and backward:
``student.swin_attention``), ``slab_conv`` (batch-1 convolutions that ATen would run on its slow path cut
into depth slabs and run on oneDNN: ``training.slab_conv``; ``training.loop.fit`` does this on a CPU, the other
settings measure PyTorch's own dispatch).
No timing is asserted anywhere: this is a measurement, its figures go in docs and the closing notes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence


def _parse_setting(name: str, default_window: int, default_batch: int) -> dict[str, Any]:
    """One setting, or several joined by ``+`` (``slab_conv+channels_last``)."""
    setting = {"name": name, "window_size": default_window, "batch": default_batch, "compile": False,
               "channels_last": False, "bf16": False, "fused_attention": False, "slab_conv": False}
    for part in name.split("+"):
        if part == "base":
            continue
        if part.startswith("window") and part[6:].isdigit():
            setting["window_size"] = int(part[6:])
        elif part.startswith("batch") and part[5:].isdigit():
            setting["batch"] = int(part[5:])
        elif part in ("compile", "channels_last", "bf16", "fused_attention", "slab_conv"):
            setting[part] = True
        else:
            raise SystemExit(f"unknown setting {part!r} (base, windowN, batchB, compile, channels_last, bf16, "
                             "fused_attention, slab_conv; join several with +)")
    return setting


def _build_teacher(teacher_cfg: dict, roi: Sequence[int], setting: dict[str, Any], num_classes: int) -> Any:
    """The teacher ``teacher_cfg`` describes, with what trains set as the pipeline sets it (``teacher.build``)."""
    import warnings

    from teacher.build import build_teacher

    cfg = {**teacher_cfg, "roi_size": list(roi), "checkpoint": None,
           "arch": {**(teacher_cfg.get("arch") or {}), "window_size": setting["window_size"]}}
    with warnings.catch_warnings():  # "no SAM checkpoint": known here, every weight trains as in the demo
        warnings.simplefilter("ignore")
        return build_teacher(cfg, num_classes, checkpoint=None)


def measure_setting(student: str, roi: Sequence[int], setting: dict[str, Any], num_classes: int = 8,
                    teacher_cfg: dict | None = None) -> dict:
    """Build, warm up and return a callable that times one training step of ``setting`` (of the teacher
    ``teacher_cfg`` describes, when given, instead of ``student``)."""
    import torch
    from monai.losses import DiceCELoss

    from student import build_student, describe

    torch.manual_seed(0)
    if teacher_cfg is not None:
        model = _build_teacher(teacher_cfg, roi, setting, num_classes)
        gflops = None  # not counted for the teacher
    else:
        model = build_student(student, num_classes, options={"window_size": setting["window_size"]})
        # Counted on MONAI's explicit attention: the FLOP counter does not see inside the fused SDPA call, and the
        # fused setting computes the same function.
        gflops = 3.0 * describe(model, roi)["gflops"] * setting["batch"]
    if setting["fused_attention"]:
        from student.swin_attention import use_fused_attention

        use_fused_attention(model)
    if setting["slab_conv"]:
        from training.slab_conv import route_convolutions

        route_convolutions(model)
    model.train()
    if setting["channels_last"]:
        from training.memory_format import to_channels_last_3d

        to_channels_last_3d(model)  # as training.loop.fit does (Module.to refuses the teacher's 4-D weights)
    step_model = torch.compile(model) if setting["compile"] else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(setting["batch"], 1, *roi, generator=gen)
    if setting["channels_last"]:
        x = x.to(memory_format=torch.channels_last_3d)
    label = torch.randint(0, num_classes, (setting["batch"], 1, *roi), generator=gen)
    target = torch.randn(setting["batch"], num_classes, *roi, generator=gen)

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting["bf16"]):
            logits = step_model(x)
        logits = logits.float()
        if teacher_cfg is not None:
            loss = loss_fn(logits, label)
        else:
            loss = 0.5 * loss_fn(logits, label) + 0.5 * torch.nn.functional.mse_loss(torch.softmax(logits, 1),
                                                                                      torch.softmax(target, 1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return {"step": step, "gflops": gflops}


def run(student: str, roi: Sequence[int], settings: Sequence[str], batch: int, steps: int, warmup: int,
        rounds: int, threads: int, teacher_cfg: dict | None = None) -> dict:
    """Measure every setting (of the teacher ``teacher_cfg`` describes, when given); returns ``{"rows",
    "peak_gflops", "machine"}``."""
    import torch

    from benchmarks.peak import cpu_supports_bf16, measure_gemm_peak
    from benchmarks.report import machine_info

    torch.set_num_threads(threads)
    parsed = []
    if teacher_cfg is not None:
        from teacher.build import teacher_arch

        default_window = teacher_arch(teacher_cfg).window_size  # the preset's, under the config's arch overrides
    else:
        default_window = 7
    base_window = next((int(s[6:]) for s in settings if s.startswith("window") and s[6:].isdigit()), default_window)
    notes = []
    for name in settings:
        setting = _parse_setting(name, base_window, batch)
        if teacher_cfg is not None and (setting["fused_attention"] or setting["compile"]):
            raise SystemExit(f"--teacher: setting {name!r} is a student setting (the teacher already fuses its "
                             "attention; compile is not wired for it)")
        if setting["bf16"] and not cpu_supports_bf16():
            notes.append("bf16 skipped: this CPU has no native bf16 (autocast would emulate it)")
            continue
        parsed.append(setting)
    peak = measure_gemm_peak("fp32", threads=threads, size=2048).gflops
    steppers = {}
    for setting in parsed:
        stepper = measure_setting(student, roi, setting, teacher_cfg=teacher_cfg)
        for _ in range(warmup):
            stepper["step"]()
        steppers[setting["name"]] = stepper
    times: dict[str, list[float]] = {s["name"]: [] for s in parsed}
    per_round = max(1, steps // max(1, rounds))
    for _ in range(max(1, rounds)):
        for setting in parsed:
            times[setting["name"]] += [steppers[setting["name"]]["step"]() for _ in range(per_round)]
    base = statistics.median(times[parsed[0]["name"]]) if parsed else float("nan")
    rows = []
    for setting in parsed:
        median = statistics.median(times[setting["name"]])
        gflops = steppers[setting["name"]]["gflops"]
        rows.append({"setting": setting["name"], "window_size": setting["window_size"], "batch": setting["batch"],
                     "s_per_step": round(median, 4), "s_per_sample": round(median / setting["batch"], 4),
                     "gflop_per_step": None if gflops is None else round(gflops, 2),
                     "pct_of_fp32_peak": None if gflops is None else round(100 * gflops / median / peak, 1),
                     "speedup_vs_first": round(base / median * setting["batch"] / parsed[0]["batch"], 2),
                     "runs": len(times[setting["name"]])})
    return {"student": "teacher" if teacher_cfg is not None else student, "roi_size": list(roi), "threads": threads,
            "peak_gflops": round(peak, 1),
            "machine": machine_info(), "rows": rows, "notes": notes}


def format_table(result: dict) -> str:
    machine = result["machine"]
    what = "Teacher" if result["student"] == "teacher" else "Student"
    lines = [f"# {what} training step: {result['student']}, ROI {result['roi_size']}, {result['threads']} threads", "",
             f"CPU: {machine.get('cpu_model')}; instruction sets: {', '.join(machine.get('cpu_features') or []) or 'unknown'}"
             + (f" (capped to {machine['isa_cap']} by ONEDNN_MAX_CPU_ISA)" if machine.get("isa_cap") else "") + "; "
             f"fp32 GEMM peak {result['peak_gflops']} GFLOP/s (same run)", "",
             "| setting | window | batch | s/step | s/sample | GFLOP/step | % of fp32 peak | samples/s vs first |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        gflop = "n/a" if r["gflop_per_step"] is None else f"{r['gflop_per_step']:.1f}"
        pct = "n/a" if r["pct_of_fp32_peak"] is None else f"{r['pct_of_fp32_peak']:.1f}"
        lines.append(f"| {r['setting']} | {r['window_size']} | {r['batch']} | {r['s_per_step']:.3f} | "
                     f"{r['s_per_sample']:.3f} | {gflop} | {pct} | {r['speedup_vs_first']:.2f}x |")
    lines += [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="swinunetr_tiny")
    parser.add_argument("--teacher", action="store_true", help="time the teacher of --config instead of a student")
    parser.add_argument("--config", default="configs/demo.yaml", help="with --teacher: the run config to read")
    parser.add_argument("--roi", type=int, nargs=3, default=None, help="default: 64 64 32, or the teacher's roi_size")
    parser.add_argument("--batch", type=int, default=None, help="default: 1, or the teacher's batch_size")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds the timed steps are spread over")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settings", nargs="+", default=["window7", "window4", "window8", "channels_last", "bf16"])
    parser.add_argument("--out", default="runs/train_step", help="folder for train_step.json / train_step.md")
    args = parser.parse_args(argv)
    from data.atomic import write_json_atomic, write_text_atomic

    teacher_cfg = None
    roi, batch = args.roi or [64, 64, 32], args.batch or 1
    if args.teacher:
        from configs import load_config

        teacher_cfg = dict(load_config(args.config)["teacher"])
        roi = args.roi or [int(v) for v in teacher_cfg["roi_size"]]
        batch = args.batch or int(teacher_cfg["batch_size"])
    result = run(args.student, roi, args.settings, batch, args.steps, args.warmup, args.rounds, args.threads,
                 teacher_cfg=teacher_cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "train_step.json", result)
    text = format_table(result)
    write_text_atomic(out / "train_step.md", text)
    print(text)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
