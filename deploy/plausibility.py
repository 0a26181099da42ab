"""Does a readable volume look like the CT the model was trained for? One judgement, in numpy only.

The edge runtime (``deploy.Segmenter``, ``python -m deploy.infer``) and the data stage
(``data.checks.check_dataset``) both call :func:`assess_ct`, so a volume the pipeline would not train on is
not segmented either, and the reverse. It runs after the structural checks (``deploy.volume_io``: 3D, finite,
an invertible affine) and decides from the voxels and the affine alone:

==========================================  =======  ==========================================================
input                                       verdict  why
==========================================  =======  ==========================================================
nothing above the body threshold (-500 HU)  refuse   all air or padding: any organ mask would be invented
body in < 0.5 % of the voxels               refuse   a table, a cable, noise: nothing to segment
every voxel the same value                  refuse   a blank image
whole numbers in 0..255                     refuse   an 8-bit export (screenshot, PNG/JPEG stack, display values)
span max - min < 200                        refuse   a normalised ([0, 1], [-1, 1]) or z-scored image, not HU
>= 10 % of voxels at 850..1200 "HU"         refuse   CT stored unsigned without its rescale intercept: soft
                                                     tissue at ~1064 instead of ~40 (HU + 1024, the classic
                                                     DICOM-to-NIfTI slip); every tissue would sit above the
                                                     model's window, so the mask would be meaningless. Refused
                                                     rather than warned: a warning arrives after a mask that
                                                     looks like an answer. Refused rather than silently shifted:
                                                     the fix belongs in the conversion, and it is a guess.
no air, no fat (0.5th percentile > -50)     refuse   MR or another positive-only image
< 4 voxels along an axis (native or on      refuse   a localiser, a single slice, a thin slab: no 3D context
  the model grid)
extent < 1/4 of the model's window          refuse   too little anatomy for the field of view it was trained on
extent < 1/2 of the model's window          warn     the model sees mostly padding there; the mask is less sure
voxel axes > 10 degrees off the patient     warn     oblique or gantry-tilted: reoriented to the nearest axes
  axes                                               without rotation (as in training), so anatomy is tilted
0.5 % of voxels above 4000 HU               warn     beyond what scanners record outside metal: a scale slip?
==========================================  =======  ==========================================================

The window checks need the model's ROI and spacing, so the data stage (which has no model yet) runs them only
when it is given both. ``force=True`` (``--force`` on the command line) turns refusals into warnings, so an
unusual but real CT (a body-only crop without fat, a small child) is not stuck: the result then says it was
forced. Thresholds are module constants.

This module imports numpy only: the data stage uses it from here (deploy must stay torch-free and must not
import the training package, so the single implementation lives on the deploy side).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

BODY_THRESHOLD_HU = -500.0  # body/air threshold, as the body crop of training and deploy (deploy/body_crop.py)
MIN_BODY_FRACTION = 0.005
MIN_HU_SPAN = 200.0
NEGATIVE_HU = -50.0
SHIFTED_BAND_HU = (850.0, 1200.0)
SHIFTED_BAND_FRACTION = 0.10
HIGH_HU = 4000.0
MIN_VOXELS = 4
REFUSE_WINDOW_FRACTION = 0.25
WARN_WINDOW_FRACTION = 0.5
OBLIQUE_WARN_DEG = 10.0
TINY_SPACING_MM = 0.05
SAMPLE_VOXELS = 2_000_000  # statistics on a regular subsample of at most about this many voxels (speed only)

REFUSE, WARN = "refuse", "warn"
AXIS_NAMES = ("left-right", "anterior-posterior", "superior-inferior")
_WORLD_AXIS = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
FORCE_HINT = "if it is a real CT, --force (force=True) segments it anyway, with a warning"


@dataclass(frozen=True)
class Finding:
    """One observation about a volume.

    Attributes:
        code: a stable identifier (``no_body``, ``blank``, ``not_hu``, ``unsigned_ct``, ``too_few_voxels``,
            ``too_small``, ``small_fov``, ``oblique``, ``high_intensities``).
        severity: ``"refuse"`` or ``"warn"``.
        message: what was seen and why it matters (without the file name).
    """

    code: str
    severity: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "severity": self.severity, "message": self.message}


@dataclass
class Assessment:
    """The judgement on one volume.

    Attributes:
        source: names the file (or array) in messages.
        findings: refusals and warnings, in the order checked.
        stats: the figures the judgement used (intensity percentiles, body fraction, extents, obliquity).
        forced: refusals were overridden (``force=True``).
    """

    source: str
    findings: list[Finding] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    forced: bool = False

    @property
    def refusals(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == REFUSE]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARN]

    @property
    def refused(self) -> bool:
        """True when the volume must not be segmented (a refusal, not forced)."""
        return bool(self.refusals) and not self.forced

    @property
    def verdict(self) -> str:
        """``"accept"``, ``"warn"``, ``"refuse"`` or ``"forced"`` (refused, overridden)."""
        if self.refusals:
            return "forced" if self.forced else "refuse"
        return "warn" if self.warnings else "accept"

    def refusal_message(self, hint: str = FORCE_HINT) -> str:
        """One message naming the file and every reason it is refused."""
        reasons = "; ".join(f.message for f in self.refusals)
        return f"{self.source}: does not look like a CT the model can segment: {reasons} ({hint})"

    def warning_messages(self) -> list[str]:
        """What the user must be told although the volume is segmented: forced refusals first, then warnings."""
        forced = [f"{self.source}: segmented only because forced: {f.message}" for f in self.refusals] if self.forced else []
        return forced + [f"{self.source}: {f.message}" for f in self.warnings]

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "verdict": self.verdict, "forced": self.forced,
                "findings": [f.as_dict() for f in self.findings], "stats": self.stats}


def _sample(image: np.ndarray) -> np.ndarray:
    step = max(1, math.ceil((image.size / SAMPLE_VOXELS) ** (1.0 / 3.0)))
    return image[::step, ::step, ::step]


def world_axes(affine: np.ndarray) -> tuple[list[int], np.ndarray]:
    """The patient (world) axis each voxel axis runs along, and the absolute direction cosines.

    Greedy on the largest cosine, one world axis per voxel axis (what ``nibabel.io_orientation`` does for
    any affine that is not pathologically sheared).

    Returns:
        ``([world axis of voxel axis 0, 1, 2], 3 x 3 |cosines| with [world, voxel])``.
    """
    rzs = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(rzs, axis=0, keepdims=True)
    cos = np.abs(rzs / np.where(norms > 0, norms, 1.0))
    out = [-1, -1, -1]
    used: set[int] = set()
    for idx in np.argsort(-cos.ravel(), kind="stable"):
        w, j = divmod(int(idx), 3)
        if w in used or out[j] != -1:
            continue
        out[j] = w
        used.add(w)
    return out, cos


def _intensity_findings(image: np.ndarray, threshold: float, stats: dict[str, Any]) -> list[Finding]:
    sample = _sample(image)
    vmin, vmax = float(image.min()), float(image.max())
    p_lo, p_mid, p_hi = (float(v) for v in np.percentile(sample, [0.5, 50.0, 99.5]))
    body = float(np.count_nonzero(sample > threshold)) / sample.size
    band = float(np.count_nonzero((sample >= SHIFTED_BAND_HU[0]) & (sample <= SHIFTED_BAND_HU[1]))) / sample.size
    stats.update({"min": vmin, "max": vmax, "p0.5": p_lo, "p50": p_mid, "p99.5": p_hi, "body_threshold_hu": threshold,
                  "body_fraction": round(body, 6), "shifted_band_fraction": round(band, 6)})
    rng = f"[{vmin:.4g}, {vmax:.4g}]"
    if vmax <= threshold:
        return [Finding("no_body", REFUSE, f"no voxel above {threshold:g} HU (intensities {rng}): nothing but air "
                                           f"or padding, no body to segment")]
    if vmax == vmin:
        return [Finding("blank", REFUSE, f"every voxel has the value {vmin:.4g}: a blank image, nothing to segment")]
    if vmin >= 0 and 1.5 < vmax <= 255 and bool(np.all(sample == np.round(sample))):
        return [Finding("not_hu", REFUSE, f"whole numbers in {rng}, nothing below 0: an 8-bit image (a screenshot, a "
                                          f"PNG/JPEG stack or display values), not Hounsfield units")]
    if vmax - vmin < MIN_HU_SPAN:
        return [Finding("not_hu", REFUSE, f"intensities span only {rng}, where CT in Hounsfield units spans air "
                                          f"(-1000) to soft tissue (+40) and bone (+300 and more): a normalised or "
                                          f"rescaled image, not HU")]
    if band >= SHIFTED_BAND_FRACTION:
        return [Finding("unsigned_ct", REFUSE,
                        f"{band:.0%} of the voxels lie at {SHIFTED_BAND_HU[0]:g}..{SHIFTED_BAND_HU[1]:g}, where CT in HU "
                        f"has only dense bone (intensities {rng}, median {p_mid:.0f}): this looks like CT stored "
                        f"unsigned without its rescale intercept (HU + 1024: air near 0, soft tissue near 1064). Fix "
                        f"the DICOM-to-NIfTI conversion (RescaleIntercept, NIfTI scl_inter = -1024) or subtract 1024; "
                        f"as it is every tissue lies above the model's intensity window (or this is not CT at all)")]
    if p_lo > NEGATIVE_HU:
        return [Finding("not_hu", REFUSE, f"no air and no fat: 99.5 % of the voxels are above {p_lo:.4g} (intensities "
                                          f"{rng}), where CT in HU shows air near -1000 and fat near -100: an MR or "
                                          f"another positive-only image, not CT in HU")]
    found = []
    if p_hi > HIGH_HU:
        found.append(Finding("high_intensities", WARN, f"0.5 % of the voxels are above {p_hi:.0f} HU, beyond what a "
                                                        f"CT records outside metal: is a rescale slope missing?"))
    if body < MIN_BODY_FRACTION:
        found.append(Finding("no_body", REFUSE, f"only {body:.2%} of the voxels are above {threshold:g} HU: almost "
                                                f"nothing but air, no body to segment"))
    return found


def _geometry_findings(shape: Sequence[int], affine: np.ndarray, spacing_mm: Sequence[float] | None,
                       roi_size: Sequence[int] | None, axcodes: str, stats: dict[str, Any]) -> list[Finding]:
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    axes, cos = world_axes(affine)
    extent = [float(n * s) for n, s in zip(shape, spacing)]
    stats.update({"shape": [int(n) for n in shape], "spacing_mm": [round(float(s), 6) for s in spacing],
                  "extent_mm": [round(e, 3) for e in extent], "axes": [AXIS_NAMES[w] for w in axes]})
    tiny = (f" (voxel spacing {float(spacing.min()):.3g} mm: is the affine in metres?)"
            if spacing.min() < TINY_SPACING_MM else "")
    found = []
    for j, n in enumerate(shape):
        if n < MIN_VOXELS:
            found.append(Finding("too_few_voxels", REFUSE,
                                 f"only {n} voxel{'s' if n != 1 else ''} along the {AXIS_NAMES[axes[j]]} axis (array "
                                 f"axis {j}): a 3D segmentation needs at least {MIN_VOXELS} along every axis (a "
                                 f"localiser, a single slice or a thin slab?)"))
    if spacing_mm is not None and roi_size is not None:
        target_of_world = {_WORLD_AXIS[c]: k for k, c in enumerate(str(axcodes).upper())}
        grid, ratios = [], []
        for j, n in enumerate(shape):
            k = target_of_world[axes[j]]
            out_spacing, window_mm = float(spacing_mm[k]), float(roi_size[k]) * float(spacing_mm[k])
            m = max(int(round((n - 1) * spacing[j] / out_spacing + 1.0)), 1)  # MONAI Spacing's output size
            ratio = extent[j] / window_mm
            grid.append(m)
            ratios.append(round(ratio, 4))
            name = AXIS_NAMES[axes[j]]
            if n < MIN_VOXELS:
                continue  # already refused above
            if m < MIN_VOXELS:
                found.append(Finding("too_few_voxels", REFUSE,
                                     f"only {m} voxel{'s' if m != 1 else ''} along the {name} axis at the model's "
                                     f"{out_spacing:g} mm spacing ({n} voxels of {spacing[j]:.3g} mm): too thin for a "
                                     f"3D segmentation{tiny}"))
                tiny = ""
            elif ratio < REFUSE_WINDOW_FRACTION:
                found.append(Finding("too_small", REFUSE,
                                     f"field of view {extent[j]:.0f} mm along the {name} axis, under a quarter of the "
                                     f"model's {window_mm:.0f} mm window: too little anatomy for the model{tiny}"))
                tiny = ""
            elif ratio < WARN_WINDOW_FRACTION:
                found.append(Finding("small_fov", WARN,
                                     f"small field of view: {extent[j]:.0f} mm along the {name} axis, under half the "
                                     f"model's {window_mm:.0f} mm window; the model sees mostly padding there, so the "
                                     f"mask is less reliable"))
        stats.update({"model_grid_shape": grid, "extent_over_window": ratios})
    oblique = max(math.degrees(math.acos(min(1.0, float(cos[axes[j], j])))) for j in range(3))
    stats["obliquity_deg"] = round(oblique, 3)
    if oblique > OBLIQUE_WARN_DEG:
        found.append(Finding("oblique", WARN,
                             f"voxel axes are {oblique:.0f} degrees off the patient axes (an oblique or gantry-tilted "
                             f"acquisition): training and deploy align a volume to the nearest axes without "
                             f"rotating it, so the model sees the anatomy tilted by that much"))
    return found


def assess_ct(image: np.ndarray, affine: np.ndarray, source: str = "input", *,
              spacing_mm: Sequence[float] | None = None, roi_size: Sequence[int] | None = None, axcodes: str = "RAS",
              body_threshold_hu: float = BODY_THRESHOLD_HU, force: bool = False) -> Assessment:
    """Judge whether a volume looks like the CT the model was trained for (module docstring: the table).

    Args:
        image: ``X x Y x Z`` finite voxels (HU expected) in the file's own axis order; structurally checked
            already (``deploy.volume_io.check_volume``).
        affine: its 4x4 voxel-to-world affine (finite, invertible).
        source: names the file in messages.
        spacing_mm: the model's voxel spacing, in ``axcodes`` order; with ``roi_size`` enables the window checks.
        roi_size: the model's window in voxels, in ``axcodes`` order.
        axcodes: the model grid's orientation (``"RAS"``).
        body_threshold_hu: voxels above it are body (the bundle's ``crop_foreground.threshold_hu``).
        force: refusals become warnings (``Assessment.refused`` is then False, ``verdict`` ``"forced"``).

    Returns:
        the :class:`Assessment`; refusing is the caller's decision (``deploy.Segmenter``, ``data.checks``).

    Raises:
        ValueError: ``image`` is not a non-empty 3D array (run the structural checks first).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.size == 0:
        raise ValueError(f"{source}: assess_ct needs a non-empty 3D array, got shape {image.shape}")
    stats: dict[str, Any] = {}
    findings = _intensity_findings(image, float(body_threshold_hu), stats)
    findings += _geometry_findings(image.shape, affine, spacing_mm, roi_size, axcodes, stats)
    return Assessment(source=str(source), findings=findings, stats=stats, forced=bool(force))
