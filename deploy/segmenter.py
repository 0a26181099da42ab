"""The edge segmenter: CT volume in, label map out, on a deploy bundle (no torch, no MONAI)."""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from deploy.body_crop import body_box, paste_logits
from deploy.bundle import load_bundle
from deploy.errors import BundleError, DeployError, ImplausibleInputError, ImplausibleInputWarning
from deploy.geometry import labels_to_source, logits_to_source, to_model_grid
from deploy.intensity import apply_intensity, check_intensity
from deploy.plausibility import BODY_THRESHOLD_HU, Assessment, assess_ct
from deploy.postprocess import PostprocessError, keep_largest_component, spec_classes
from deploy.runtime import ModelSession
from deploy.sliding_window import sliding_window_logits, window_count
from deploy.volume_io import check_volume, label_dtype, read_volume, write_mask


class Segmenter:
    """Segment CT volumes with a deploy bundle.

    The steps are those of the training preprocessing (docs/interfaces.md), re-implemented in numpy:
    reorient to the bundle's axcodes, resample trilinearly to its spacing, crop to the body (if the bundle
    says so, as the training preprocessing does), clip and scale intensities,
    Gaussian-weighted sliding window at the bundle's ROI, logits resampled linearly back to the input's
    grid, argmax, orientation undone. Where the bundle says so (``postprocess``, chosen on validation at
    training), only the largest connected piece of some classes is kept, on the model grid before resampling
    back (``deploy.postprocess``).

    Before any of that, every volume is judged (``deploy.plausibility``: HU, a body, enough extent for the
    ROI, orientation): one that does not look like the CT the model was trained for raises
    ``ImplausibleInputError`` naming the file and the reasons, unless ``force=True``; warnings (and forced
    refusals) go out as ``ImplausibleInputWarning`` and stay in ``last_check`` (an ``Assessment``).

    Args:
        bundle_dir: a folder written by ``export.build_bundle``; its checksums are verified.
        runtime: ``"openvino"``, ``"onnxruntime"`` or ``"auto"``.
        precision: ``"fp32"``, ``"bf16"``, ``"int8"`` or ``"auto"``. With ``"auto"`` in either, the device picks
            the fastest model the bundle offers whose recorded Dice is within the export's bound of FP32,
            measured once and cached per machine (``deploy.autoselect``); ``choice`` holds what it picked and why.
        threads: inference threads (``None``: the runtime's default).
        overlap: window overlap; ``None`` uses the bundle's.
        batch_size: windows per call (``None``: the bundle's static batch, or 1 if dynamic).
        resample_back: ``"logits"`` (linear, smoother boundaries) or ``"labels"`` (nearest neighbour on the
            argmax, exactly what MONAI ``Invertd`` does in evaluation).
        compile_cache: keep compiled OpenVINO models (and the auto choice) in the machine's cache folder
            (``deploy.machine``): the next process loads instead of compiling.
    """

    def __init__(self, bundle_dir: str | Path, runtime: str = "openvino", precision: str = "fp32",
                 threads: int | None = None, overlap: float | None = None, batch_size: int | None = None,
                 resample_back: str = "logits", compile_cache: bool = False):
        self.bundle_dir = Path(bundle_dir)
        self._configure(load_bundle(bundle_dir), str(self.bundle_dir / "model.json"), overlap, resample_back)
        static = self.bundle.get("batch", 1)
        self.batch_size = int(batch_size or (1 if static == "dynamic" else static))
        self.threads = threads
        self.choice = None
        if runtime == "auto" or precision == "auto":
            from deploy.autoselect import choose

            self.choice = choose(self.bundle, threads, runtime, precision, use_cache=compile_cache)
            runtime, precision = self.choice.runtime, self.choice.precision
        self.runtime, self.precision = runtime, precision
        self.session = ModelSession(self.bundle, runtime, precision, threads, self.batch_size, compile_cache=compile_cache)

    @classmethod
    def with_predictor(cls, manifest: dict[str, Any], predictor, source: str = "manifest", overlap: float | None = None,
                       batch_size: int = 1, resample_back: str = "logits") -> "Segmenter":
        """The same steps around any window predictor, e.g. an eager PyTorch model in the benchmark.

        Args:
            manifest: the ``model.json`` fields the steps read: ``preprocess``, ``roi_size``, ``num_classes``,
                ``labels``, ``overlap`` and optionally ``crop_foreground``.
            predictor: maps ``B x C x roi`` float32 to ``B x K x roi`` logits.
            source: names the manifest in error messages.
            overlap, batch_size, resample_back: as in the constructor.
        """
        missing = [k for k in ("preprocess", "roi_size", "num_classes", "labels", "overlap") if k not in manifest]
        if missing:
            raise BundleError(f"{source}: missing {', '.join(missing)}")
        self = cls.__new__(cls)
        self.bundle_dir = None
        self._configure(manifest, source, overlap, resample_back)
        self.batch_size = int(batch_size)
        self.threads = None
        self.session = predictor
        return self

    def _configure(self, bundle: dict[str, Any], manifest: str, overlap: float | None, resample_back: str) -> None:
        if resample_back not in ("logits", "labels"):
            raise DeployError(f"resample_back must be 'logits' or 'labels', got {resample_back!r}")
        self.resample_back = resample_back
        self.bundle = bundle
        spec = self.bundle["preprocess"]
        try:
            self.spacing_mm = [float(s) for s in spec["spacing_mm"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{manifest}: preprocess.spacing_mm must be 3 numbers") from exc
        if len(self.spacing_mm) != 3 or not all(math.isfinite(s) and s > 0 for s in self.spacing_mm):
            raise BundleError(f"{manifest}: preprocess.spacing_mm must be 3 positive numbers, got {spec['spacing_mm']}")
        self.axcodes = str(spec.get("orientation", "RAS")).upper()
        self.intensity = check_intensity(spec, str(manifest))
        self.overlap = float(self.bundle["overlap"] if overlap is None else overlap)
        if not 0.0 <= self.overlap < 1.0:
            raise DeployError(f"overlap must be in [0, 1), got {self.overlap}")
        self.roi_size = self.bundle["roi_size"]
        self.last_check: Assessment | None = None
        self.last_windows: int | None = None  # sliding-window positions of the last volume
        self.num_classes = self.bundle["num_classes"]
        self.labels = self.bundle["labels"]
        try:
            self.clean_classes = spec_classes(self.bundle.get("postprocess"), self.num_classes, str(manifest))
        except PostprocessError as exc:
            raise BundleError(str(exc)) from exc
        crop = self.bundle.get("crop_foreground")
        try:
            self.crop = None if crop is None else (float(crop["threshold_hu"]), int(crop["margin"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{manifest}: crop_foreground must hold threshold_hu and margin, got {crop!r}") from exc

    def check(self, image: np.ndarray, affine: np.ndarray, source: str = "input", force: bool = False) -> Assessment:
        """Judge a volume against this bundle (HU, body, extent against the ROI, orientation) without segmenting.

        Args:
            image: ``X x Y x Z`` voxels (HU) in the file's own axis order.
            affine: its 4x4 affine.
            source: names the input in messages.
            force: refusals become warnings.

        Returns:
            the :class:`deploy.plausibility.Assessment` (raises only for structurally bad input).
        """
        image = check_volume(image, affine, source)
        return self._assess(image, affine, source, force)

    def _assess(self, image: np.ndarray, affine: np.ndarray, source: str, force: bool) -> Assessment:
        threshold = self.crop[0] if self.crop else BODY_THRESHOLD_HU
        return assess_ct(image, affine, source, spacing_mm=self.spacing_mm, roi_size=self.roi_size,
                         axcodes=self.axcodes, body_threshold_hu=threshold, force=force)

    def _judge(self, image: np.ndarray, affine: np.ndarray, source: str, force: bool) -> None:
        self.last_check = assessment = self._assess(image, affine, source, force)
        if assessment.refused:
            raise ImplausibleInputError(assessment.refusal_message(), assessment)
        for message in assessment.warning_messages():
            warnings.warn(message, ImplausibleInputWarning, stacklevel=4)

    def predict_logits(self, image: np.ndarray, affine: np.ndarray, source: str = "input",
                       force: bool = False) -> tuple[np.ndarray, Any]:
        """Model-grid logits of a volume.

        Args:
            image: ``X x Y x Z`` voxels (HU) in the file's own axis order.
            affine: its 4x4 affine.
            source: names the input in error messages.
            force: segment a volume the input checks refuse (with an ``ImplausibleInputWarning``).

        Returns:
            ``(K x X' x Y' x Z' logits on the model grid, Geometry to map them back)``.

        Raises:
            InputVolumeError: not a usable 3D volume; ``ImplausibleInputError`` (a subclass): not a plausible CT.
        """
        image = check_volume(image, affine, source)
        self._judge(image, affine, source, force)
        resampled, geometry = to_model_grid(image, affine, self.spacing_mm, self.axcodes)
        box = body_box(resampled, *self.crop) if self.crop else tuple(slice(0, s) for s in resampled.shape)
        model_input = apply_intensity(resampled[box], self.intensity)[None]
        self.last_windows = window_count(model_input.shape[1:], self.roi_size, self.overlap)
        logits = sliding_window_logits(model_input, self.session, self.roi_size, self.num_classes,
                                       self.overlap, self.batch_size)
        if self.crop:
            logits = paste_logits(logits, box, resampled.shape)
        return logits, geometry

    def segment(self, image: np.ndarray, affine: np.ndarray, force: bool = False) -> np.ndarray:
        """Label map of a volume, aligned voxel for voxel with ``image``.

        Args:
            image: ``X x Y x Z`` voxels (HU; any integer or float type) in the file's axis order.
            affine: its 4x4 voxel-to-world affine (any axis-permuted/flipped orientation).
            force: segment a volume the input checks refuse (see :meth:`predict_logits`).

        Returns:
            ``X x Y x Z`` class indices (uint8, int16 beyond 256 classes).
        """
        logits, geometry = self.predict_logits(image, affine, force=force)
        return self._to_source(logits, geometry).astype(label_dtype(self.num_classes))

    def _to_source(self, logits: np.ndarray, geometry) -> np.ndarray:
        logits = self.postprocess(logits)
        if self.resample_back == "labels":
            return labels_to_source(np.argmax(logits, axis=0).astype(label_dtype(self.num_classes)), geometry)
        return logits_to_source(logits, geometry)

    def postprocess(self, logits: np.ndarray) -> np.ndarray:
        """Model-grid logits with the bundle's postprocessing applied (unchanged when it has none)."""
        return keep_largest_component(logits, self.clean_classes) if self.clean_classes else logits

    def segment_file(self, in_path: str | Path, out_path: str | Path, overlay: str | Path | None = None,
                     force: bool = False) -> np.ndarray:
        """Segment a NIfTI and write the mask with the input's exact affine and shape (atomically).

        Args:
            in_path: CT NIfTI (``.nii``/``.nii.gz``).
            out_path: mask destination (nothing is written when the input is refused).
            overlay: optional PNG with a few axial slices (needs matplotlib).
            force: segment a volume the input checks refuse (see :meth:`predict_logits`).

        Returns:
            the label map that was written.
        """
        image, affine, reference = read_volume(in_path)
        logits, geometry = self.predict_logits(image, affine, str(in_path), force=force)
        labels = self._to_source(logits, geometry)
        write_mask(out_path, labels, reference, self.num_classes)
        if overlay is not None:
            from deploy.overlay import write_overlay

            write_overlay(overlay, image, labels, affine, self.labels)
        return labels
