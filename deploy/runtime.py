"""Fixed-shape model sessions on OpenVINO or ONNX Runtime, with an explicit precision.

Each backend is imported only when chosen, so an edge device needs just the one it uses.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from deploy.errors import RuntimeChoiceError
from deploy.machine import prune_blobs, usable_cache_dir

RUNTIMES = ("openvino", "onnxruntime")
PRECISIONS = ("fp32", "bf16", "int8")


def cpu_supports_bf16(core: Any = None) -> bool:
    """Whether OpenVINO's CPU plugin reports native bf16 (``OPTIMIZATION_CAPABILITIES``): the one check of it
    (export, benchmarks and the auto choice ask here)."""
    from deploy.machine import has_native_bf16_flags, isa_cap

    if isa_cap() is not None and not has_native_bf16_flags():
        return False  # OpenVINO still lists BF16 under an ONEDNN_MAX_CPU_ISA cap, but its kernels may not use it
    if core is None:
        import openvino as ov

        core = ov.Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class ModelSession:
    """One compiled model; call it on ``B x C x roi`` float32 to get ``B x K x roi`` logits.

    Args:
        bundle: a manifest from :func:`deploy.bundle.load_bundle`.
        runtime: ``"openvino"`` or ``"onnxruntime"``.
        precision: ``"fp32"``, ``"bf16"`` (OpenVINO, CPUs with native bf16) or ``"int8"`` (if exported).
        threads: inference threads; ``None`` lets the runtime decide.
        batch_size: windows per call. OpenVINO compiles a dynamic-batch model for this static batch: its CPU
            kernels for static shapes are faster (SwinUNETR-tiny, 64x64x32: 14 % per window, measured in
            benchmarks/targets.md); shorter calls are padded up to it.
        compile_cache: keep OpenVINO's compiled model in the machine's cache folder (``deploy.machine``), so
            that the next process loads it instead of compiling (tiny student INT8: 0.40 -> 0.10 s).
    """

    def __init__(self, bundle: Mapping[str, Any], runtime: str = "openvino", precision: str = "fp32", threads: int | None = None,
                 batch_size: int = 1, compile_cache: bool = False):
        if runtime not in RUNTIMES:
            raise RuntimeChoiceError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        if precision not in PRECISIONS:
            raise RuntimeChoiceError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if threads is not None and int(threads) < 1:
            raise RuntimeChoiceError(f"threads must be >= 1, got {threads}")
        offered = (bundle.get("models") or {}).get(runtime) or {}
        if precision not in offered:
            raise RuntimeChoiceError(
                f"{bundle.get('dir')}: the bundle offers no {precision} model for {runtime} (has {sorted(offered)})"
            )
        self.runtime, self.precision = runtime, precision
        self.path = Path(bundle["dir"]) / offered[precision]
        self.input_name, self.output_name = bundle["input_name"], bundle["output_name"]
        # A static batch fixes how many windows one call takes; "dynamic" takes any.
        self.batch = bundle.get("batch", 1)
        if int(batch_size) < 1:
            raise RuntimeChoiceError(f"batch_size must be >= 1, got {batch_size}")
        if runtime == "openvino":
            static_shape = None
            if self.batch == "dynamic":
                self.batch = int(batch_size)
                channels = int((bundle.get("input_shape") or [None, 1])[1])
                static_shape = [self.batch, channels, *[int(s) for s in bundle["roi_size"]]]
            self._run = self._open_openvino(precision, threads, static_shape, compile_cache)
        else:
            self._run = self._open_onnxruntime(threads)

    def _open_openvino(self, precision: str, threads: int | None, static_shape: list[int] | None = None,
                       compile_cache: bool = False):
        import openvino as ov

        core = ov.Core()
        blobs = usable_cache_dir("openvino") if compile_cache else None
        if blobs is not None:
            core.set_property({"CACHE_DIR": str(blobs)})
        if precision == "bf16" and not cpu_supports_bf16(core):
            raise RuntimeChoiceError("precision bf16: this CPU has no native bf16 (OpenVINO OPTIMIZATION_CAPABILITIES)")
        # INT8 layers run in int8 whatever the hint; the hint fixes the precision of the layers left in float.
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        model = core.read_model(str(self.path))
        if static_shape is not None:
            model.reshape({model.inputs[0].get_any_name(): ov.PartialShape(static_shape)})
        compiled = core.compile_model(model, "CPU", config)
        if blobs is not None:
            prune_blobs(blobs)
        request = compiled.create_infer_request()
        output = compiled.output(0)

        def run(batch: np.ndarray) -> np.ndarray:
            # shared output memory is overwritten by the next call: copy it once, here
            result = request.infer({0: batch}, share_inputs=True, share_outputs=True)[output]
            return np.array(result, dtype=np.float32, copy=True)

        return run

    def _open_onnxruntime(self, threads: int | None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

        def run(batch: np.ndarray) -> np.ndarray:
            return np.asarray(session.run([self.output_name], {self.input_name: batch})[0], dtype=np.float32)

        return run

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Logits ``B x K x roi`` for ``B x C x roi`` float32 input (split into the model's static batch)."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.batch == "dynamic" or batch.shape[0] == int(self.batch):
            return self._run(batch)
        step = int(self.batch)
        outs = []
        for i in range(0, batch.shape[0], step):
            chunk = batch[i : i + step]
            short = step - chunk.shape[0]
            if short:
                chunk = np.concatenate([chunk, np.zeros((short, *chunk.shape[1:]), np.float32)])
            outs.append(self._run(chunk)[: step - short])
        return np.concatenate(outs)
