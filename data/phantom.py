"""Synthetic abdominal CT phantoms with organ labels: the anatomy of one case (:func:`make_phantom`).

Each case is a contrast-enhanced abdomen in Hounsfield units: a body outline with subcutaneous fat and a
muscle wall, ribs, a spine with vertebral bodies, discs and posterior arches, lung bases, bowel loops in
mesenteric fat, unlabelled vessels (IVC, SMV), and labelled organs in their anatomical places: liver on
the patient's right, spleen on the left, kidneys posterior beside the spine, aorta anterior-left of the
spine, pancreas across the midline in front of the aorta, stomach left-anterior, and a gallbladder under
the liver (labelled on request). Organ intensities overlap (liver / spleen / muscle, pancreas / bowel),
so a model has to learn shape and position, not a threshold.

The anatomy is drawn in a canonical frame of an adult abdomen (millimetres, RAS, z from the inferior
edge of the field of view) and scaled into a fixed physical field of view; ``size`` only changes the
voxel count, so a small phantom is a coarser scan of the same anatomy. The shapes and noise fields come
from ``data.phantom_geometry``. ``data.phantom_dataset`` writes cases as an MSD-layout dataset;
``python -m data.phantom`` runs its command line (``data.phantom_dataset.main``).
"""
from __future__ import annotations

import math
import sys
from typing import Sequence

import numpy as np
from scipy import ndimage

from data.phantom_geometry import Canvas, Grid, ellipsoid, shape_modes, smooth_noise, tube

# Bump when the anatomy or intensities change, so cached phantom datasets are regenerated.
PHANTOM_VERSION = 1
FIELD_OF_VIEW_MM = (204.8, 204.8, 240.0)
DEFAULT_SIZE = (256, 256, 96)
LABELS = {
    0: "background",
    1: "liver",
    2: "spleen",
    3: "right_kidney",
    4: "left_kidney",
    5: "pancreas",
    6: "stomach",
    7: "aorta",
    8: "gallbladder",
}
# The canonical frame spans x, y in [-170, 170] mm and z in [0, 240] mm; it is scaled into the field of view.
_CANONICAL_HALF_WIDTH_MM = 170.0
_CANONICAL_HEIGHT_MM = 240.0


class PhantomError(ValueError):
    """Invalid phantom parameters (size, case counts, output folder)."""


def _case_parameters(rng: np.random.Generator) -> dict:
    """Draw every per-case random number in a fixed order (determinism does not depend on size)."""
    n = rng.normal
    u = rng.uniform
    p = {
        "body_a": u(138, 160), "body_b": u(100, 118), "body_p": u(2.1, 2.6), "body_dy": u(-6, 6),
        "fat_mm": u(10, 26), "muscle_mm": u(7, 12), "z_shift": u(-12, 12), "organ_scale": u(0.92, 1.08),
        "hu": {
            "fat": n(-100, 8), "muscle": n(50, 5), "liver": n(62, 7), "spleen_delta": n(-8, 7),
            "kidney": n(165, 20), "medulla_delta": n(-55, 12), "pancreas": n(42, 6), "stomach_wall": n(45, 6),
            "stomach_fluid": n(15, 8), "aorta": n(210, 35), "ivc": n(115, 25), "gallbladder": n(10, 5),
            "bowel": n(32, 8), "cancellous": n(300, 50), "cortical": n(850, 100), "disc": n(90, 10),
            "csf": n(15, 5), "lung": n(-850, 30), "portal": n(160, 25),
        },
        "texture_hu": u(5, 10), "noise_hu": u(8, 20), "blur_vox": u(0.45, 0.75),
        "stomach_air_level": u(42, 80), "bowel_threshold": u(-0.1, 0.5),
        "origin": (u(-25, 25), u(-25, 25), u(-700, -300)),
    }
    organs = {}
    for name in ("liver_r", "liver_l", "spleen", "kidney_r", "kidney_l", "gallbladder", "lung_r", "lung_l"):
        organs[name] = {
            "shift": rng.normal(0, 5, size=3), "scale": rng.uniform(0.88, 1.12, size=3),
            "angle": rng.normal(0, 8), "modes": shape_modes(rng, 0.07),
        }
    for name in ("stomach", "pancreas", "duodenum", "aorta", "ivc"):
        organs[name] = {"shift": rng.normal(0, 4, size=3), "wiggle": rng.normal(0, 4, size=(5, 3)),
                        "scale": rng.uniform(0.85, 1.15)}
    p["organs"] = organs
    return p


def field_of_view(size: Sequence[int], spacing_mm: Sequence[float] | None) -> tuple[float, float, float]:
    """The field of view (mm) of a phantom: ``FIELD_OF_VIEW_MM``, or ``size × spacing_mm`` when a spacing is given."""
    if spacing_mm is None:
        return FIELD_OF_VIEW_MM
    try:
        spacing = tuple(float(v) for v in spacing_mm)
    except (TypeError, ValueError) as exc:
        raise PhantomError(f"phantom spacing must be three numbers (mm), got {spacing_mm!r}") from exc
    if len(spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in spacing):
        raise PhantomError(f"phantom spacing must be three positive numbers (mm), got {spacing_mm!r}")
    return tuple(n * v for n, v in zip(size, spacing))  # type: ignore[return-value]


def _make_grid(size: Sequence[int], z_shift: float, fov: Sequence[float] = FIELD_OF_VIEW_MM) -> Grid:
    """Voxel centres in the canonical frame. The anatomy always has the size it has in ``FIELD_OF_VIEW_MM``
    (the training phantoms'); a larger field of view adds air around the body in x, y and more trunk in z,
    with the anatomy centred, as a clinical CT of the same patient would."""
    spacing = tuple(f / n for f, n in zip(fov, size))
    scale_xy = FIELD_OF_VIEW_MM[0] / (2 * _CANONICAL_HALF_WIDTH_MM)
    scale_z = FIELD_OF_VIEW_MM[2] / _CANONICAL_HEIGHT_MM
    x = ((np.arange(size[0]) + 0.5) * spacing[0] - fov[0] / 2) / scale_xy
    y = ((np.arange(size[1]) + 0.5) * spacing[1] - fov[1] / 2) / scale_xy
    z = ((np.arange(size[2]) + 0.5) * spacing[2] - (fov[2] - FIELD_OF_VIEW_MM[2]) / 2) / scale_z + z_shift
    return Grid(x.astype(np.float32), y.astype(np.float32), z.astype(np.float32), spacing)


def _paint_body(c: Canvas, p: dict, bowel_field: np.ndarray, fine: np.ndarray, shape_noise: np.ndarray) -> None:
    """Body outline, fat, muscle wall, abdominal cavity with bowel in mesenteric fat, and ribs."""
    g, hu = c.grid, p["hu"]
    x, y, z = g.x[:, None, None], g.y[None, :, None], g.z[None, None, :]
    # Slightly wider towards the chest, flatter posteriorly (the patient lies on the table).
    a = p["body_a"] * (1.0 + 0.0004 * (z - 120.0))
    b = np.where(y - p["body_dy"] < 0, 0.93, 1.0) * p["body_b"]
    rho = (np.abs(x / a) ** p["body_p"] + np.abs((y - p["body_dy"]) / b) ** p["body_p"]) ** (1.0 / p["body_p"])
    rho = rho + 0.012 * shape_noise
    mean_radius = 0.5 * (p["body_a"] + p["body_b"])
    muscle_outer = 1.0 - p["fat_mm"] / mean_radius
    cavity_edge = muscle_outer - p["muscle_mm"] / mean_radius
    body = rho < 1.0
    c.image[body] = hu["fat"]
    c.image[(rho < muscle_outer) & body] = hu["muscle"]
    c.cavity = rho < cavity_edge
    bowel = bowel_field > p["bowel_threshold"]
    content = np.where(bowel, hu["bowel"], hu["fat"]).astype(np.float32)
    # Gas bubbles inside bowel loops.
    content[bowel & (fine > 2.1)] = -800.0
    c.image[c.cavity] = content[c.cavity]
    # Ribs: arcs in the wall, periodic along z, descending anteriorly; absent at the anterior midline and spine.
    angle = np.arctan2(y - p["body_dy"], x)
    lateral = np.abs(np.cos(angle))
    rib_mid = 0.5 * (cavity_edge + muscle_outer)
    rib_zone = (np.abs(rho - rib_mid) < 4.0 / mean_radius) & (lateral > 0.35) & (z > 95.0)
    rib_phase = np.mod(z + 14.0 * np.sin(angle), 30.0)
    c.image[rib_zone & (rib_phase < 6.0)] = hu["cortical"] * 0.7


def _paint_spine_and_muscles(c: Canvas, p: dict) -> None:
    g, hu = c.grid, p["hu"]
    box, (x, y, z) = g.box([-60, -125, -20], [60, -15, 260])
    full = np.ones(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=bool)
    region = c.image[box]
    paraspinal = (((np.abs(x) - 36) / 27) ** 2 + ((y + 88) / 18) ** 2 < 1.0) & full
    region[paraspinal] = hu["muscle"]
    # Psoas grows inferiorly beside the vertebral bodies.
    psoas_r = np.clip((140.0 - z) * 0.14, 0.0, 20.0)
    psoas = ((np.abs(x) - 34) ** 2 + (y + 40) ** 2 < psoas_r**2) & full
    region[psoas] = hu["muscle"]
    phase = np.mod(z, 32.0)
    disc = (phase < 7.0) & full
    vb = np.sqrt((x / 22) ** 2 + ((y + 45) / 18) ** 2)
    region[(vb < 1.0) & ~disc] = hu["cortical"]
    region[(vb < 0.8) & ~disc] = hu["cancellous"]
    region[(vb < 1.0) & disc] = hu["disc"]
    canal = np.sqrt(x**2 + (y + 75) ** 2)
    arch_level = (phase > 9.0) & (phase < 27.0)
    region[(canal < 17) & (canal >= 9) & (y < -63) & arch_level] = hu["cortical"] * 0.8
    region[(canal < 9) & full] = hu["csf"]
    spinous = (np.abs(x) < 5) & (y < -88) & (y > -104) & arch_level
    transverse = (np.abs(x) > 14) & (np.abs(x) < 42) & (np.abs(y + 80) < 5) & (phase > 12) & (phase < 22)
    region[spinous | transverse] = hu["cortical"] * 0.8
    # Keep organs out of the spine and back muscles.
    c.cavity[box] &= ~((vb < 1.15) | paraspinal | (canal < 19) | ((np.abs(x) < 8) & (y < -60)))


def _shifted(base: Sequence[float], org: dict, scale: float) -> list[float]:
    return [b * scale + s for b, s in zip(base, org["shift"])]


def _path(points: Sequence[Sequence[float]], org: dict, scale: float) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64) * scale + org["shift"]
    return pts + org["wiggle"][: len(pts)] * np.array([1.0, 1.0, 0.5])


def _paint_organs(c: Canvas, p: dict, fine: np.ndarray, shape_noise: np.ndarray, label_gallbladder: bool) -> None:
    g, hu, o, s = c.grid, p["hu"], p["organs"], p["organ_scale"]

    def ell(name: str, centre, radii, angle=0.0):
        org = o[name]
        box, level = ellipsoid(g, _shifted(centre, org, s), [r * s * k for r, k in zip(radii, org["scale"])],
                                angle + org["angle"], org["modes"])
        return box, level + 0.04 * shape_noise[box]

    def textured(box, base: float, amount: float = 1.0) -> np.ndarray:
        return base + amount * p["texture_hu"] * fine[box]

    # Lung bases sit above the liver dome and spleen, posterior-lateral.
    for name, sign in (("lung_r", 1), ("lung_l", -1)):
        box, level = ell(name, (sign * 78, -20, 295), (62, 78, 95))
        c.paint(box, level < 1.0, textured(box, hu["lung"], 2.0))

    liver = hu["liver"]
    box_r, level_r = ell("liver_r", (60, 2, 178), (78, 88, 70), 10)
    c.paint(box_r, level_r < 1.0, textured(box_r, liver), 1)
    box_l, level_l = ell("liver_l", (-22, 42, 192), (55, 38, 36), -10)
    c.paint(box_l, level_l < 1.0, textured(box_l, liver), 1)
    # Portal / hepatic vessel branches inside the liver are part of the liver label, as in real annotations.
    vessels = tube(g, _path([(20, 10, 140), (45, 20, 165), (75, 5, 190), (95, -10, 210)], o["ivc"], s), [6, 5, 4, 3])
    c.paint(vessels[0], (vessels[1] < 1.0) & (c.label[vessels[0]] == 1), hu["portal"])

    box, level = ell("spleen", (-82, -36, 172), (28, 56, 52), -40)
    sx, sy, sz = (g.x[box[0]][:, None, None], g.y[box[1]][None, :, None], g.z[box[2]][None, None, :])
    centre = _shifted((-48, -16, 172), o["spleen"], s)
    hilum = (sx - centre[0]) ** 2 + (sy - centre[1]) ** 2 + ((sz - centre[2]) * 0.6) ** 2 < (24 * s) ** 2
    c.paint(box, (level < 1.0) & ~hilum, textured(box, liver + hu["spleen_delta"]), 2)

    stomach_pts = _path([(-52, -8, 208), (-46, 28, 172), (-8, 52, 143), (24, 44, 133)], o["stomach"], s)
    box, level = tube(g, stomach_pts, np.array([32, 29, 19, 12]) * s * o["stomach"]["scale"])
    level = level + 0.05 * shape_noise[box]
    inside = level < 1.0
    sy = np.broadcast_to(g.y[box[1]][None, :, None], level.shape)
    lumen_hu = np.where(sy > p["stomach_air_level"] * s, -900.0, hu["stomach_fluid"])
    stomach_hu = np.where(level > 0.82, hu["stomach_wall"], lumen_hu) + p["texture_hu"] * 0.6 * fine[box]
    c.paint(box, inside, stomach_hu.astype(np.float32), 6)

    # Duodenum wraps the pancreatic head: unlabelled bowel with the same HU range as pancreas.
    duo = _path([(24, 44, 133), (46, 22, 122), (48, 4, 98), (12, -6, 86), (-18, 2, 92)], o["duodenum"], s)
    box, level = tube(g, duo, np.array([11, 11, 10, 9, 9]) * s * o["duodenum"]["scale"])
    duo_hu = np.where(fine[box] > 2.0, -700.0, hu["bowel"] + p["texture_hu"] * fine[box])
    c.paint(box, level < 1.0, duo_hu.astype(np.float32), 0)

    pan = _path([(30, 6, 110), (6, 16, 119), (-30, 10, 130), (-60, -6, 146)], o["pancreas"], s)
    box, level = tube(g, pan, np.array([15, 10, 10, 9]) * s * o["pancreas"]["scale"])
    level = level + 0.06 * shape_noise[box]
    # Lobulated texture: pancreas is interspersed with fat.
    c.paint(box, level < 1.0, textured(box, hu["pancreas"], 1.5), 5)

    for name, sign, lab, centre in (("kidney_r", 1, 3, (62, -42, 86)), ("kidney_l", -1, 4, (-62, -37, 100))):
        box, level = ell(name, centre, (21, 27, 50), sign * 30)
        cen = _shifted(centre, o[name], s)
        kx, ky, kz = (g.x[box[0]][:, None, None], g.y[box[1]][None, :, None], g.z[box[2]][None, None, :])
        # Hilum faces antero-medially: carve it out so the kidney is bean-shaped.
        hx, hy = cen[0] - sign * 20 * s, cen[1] + 12 * s
        hilum = (kx - hx) ** 2 + (ky - hy) ** 2 + ((kz - cen[2]) * 0.55) ** 2 < (13 * s) ** 2
        medulla = (level + 0.12 * fine[box]) < 0.62
        kidney_hu = np.where(medulla, hu["kidney"] + hu["medulla_delta"], hu["kidney"]) + p["texture_hu"] * fine[box]
        c.paint(box, (level < 1.0) & ~hilum, kidney_hu.astype(np.float32), lab)

    box, level = ell("gallbladder", (42, 50, 128), (14, 16, 27), 20)
    c.paint(box, level < 1.0, textured(box, hu["gallbladder"], 0.5), 8 if label_gallbladder else 0)

    # Vessels last: the IVC passes behind the liver (not liver), the aorta runs along the spine.
    aorta = _path([(-14, -14, -10), (-13, -16, 80), (-11, -18, 170), (-9, -22, 250)], o["aorta"], s)
    box, level = tube(g, aorta, np.full(4, 11.0) * s * o["aorta"]["scale"])
    c.paint(box, level < 1.0, textured(box, hu["aorta"], 0.5), 7, clip_to_cavity=False)
    ivc = _path([(24, -12, -10), (24, -10, 120), (28, -14, 200), (30, -20, 250)], o["ivc"], s)
    box, level = tube(g, ivc, np.full(4, 11.0) * s * o["ivc"]["scale"])
    c.paint(box, level < 1.0, textured(box, hu["ivc"], 0.5), 0, clip_to_cavity=False)
    smv = _path([(8, 4, -10), (7, 2, 60), (6, 0, 112)], o["aorta"], s)
    box, level = tube(g, smv, np.full(3, 5.0) * s)
    c.paint(box, (level < 1.0) & (c.label[box] == 0), textured(box, hu["portal"], 0.5), 0)


def phantom_affine(size: Sequence[int], origin_offset: Sequence[float] = (0.0, 0.0, -500.0),
                   fov: Sequence[float] = FIELD_OF_VIEW_MM) -> np.ndarray:
    """LPS-ordered voxel-to-RAS-world affine of a phantom array, as DICOM-derived NIfTI usually has.

    Voxel axis 0 runs towards the patient's left, axis 1 towards posterior, axis 2 towards superior.

    Args:
        size: voxel counts (X, Y, Z) of the stored array.
        origin_offset: world position (mm) of the field-of-view centre in x, y and of its inferior edge in z.
        fov: field of view (mm), :func:`field_of_view`.
    """
    spacing = [f / n for f, n in zip(fov, size)]
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[0, 3] = origin_offset[0] + fov[0] / 2 - spacing[0] / 2
    affine[1, 3] = origin_offset[1] + fov[1] / 2 - spacing[1] / 2
    affine[2, 3] = origin_offset[2] + spacing[2] / 2
    return affine


def validate_size(size: Sequence[int]) -> tuple[int, int, int]:
    """``size`` as three ints (X, Y, Z), each at least 8; else a :class:`PhantomError` naming it."""
    try:
        out = tuple(int(v) for v in size)
    except (TypeError, ValueError) as exc:
        raise PhantomError(f"phantom size must be three integers, got {size!r}") from exc
    if len(out) != 3 or min(out) < 8:
        raise PhantomError(f"phantom size must be three integers >= 8 (X Y Z), got {size!r}")
    return out  # type: ignore[return-value]


def make_phantom(rng_or_seed: int | np.random.Generator, size: Sequence[int] = DEFAULT_SIZE, *,
                 label_gallbladder: bool = False, spacing_mm: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate one synthetic abdominal CT case.

    Args:
        rng_or_seed: an integer seed or a numpy Generator; the same seed gives byte-identical arrays.
        size: voxel counts (X, Y, Z); the physical field of view is 204.8 x 204.8 x 240 mm unless ``spacing_mm``.
        label_gallbladder: label the gallbladder as class 8 (otherwise it is unlabelled tissue).
        spacing_mm: voxel spacing; the field of view is then ``size × spacing_mm`` (e.g. a clinical-size CT,
            512 x 512 x 200 at 0.8 x 0.8 x 2.5 mm), with the anatomy at its usual size, centred.

    Returns:
        image_hu: int16 array (X, Y, Z) in Hounsfield units, stored LPS-ordered (see ``phantom_affine``).
        label: uint8 array (X, Y, Z), classes of ``LABELS`` (1..7, and 8 if ``label_gallbladder``).
        affine: 4x4 voxel-to-world (RAS mm) matrix with flipped x, y axes and an origin offset.
    """
    size = validate_size(size)
    rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)
    p = _case_parameters(rng)
    fov = field_of_view(size, spacing_mm)
    grid = _make_grid(size, p["z_shift"], fov)
    shape_noise = smooth_noise(rng, size, grid.spacing_mm, 12.0)
    bowel_field = smooth_noise(rng, size, grid.spacing_mm, 16.0)
    fine = smooth_noise(rng, size, grid.spacing_mm, 3.0)
    acquisition = rng.standard_normal(size, dtype=np.float32)

    canvas = Canvas(grid)
    _paint_body(canvas, p, bowel_field, fine, shape_noise)
    _paint_spine_and_muscles(canvas, p)
    _paint_organs(canvas, p, fine, shape_noise, label_gallbladder)

    # Partial-volume blur of about one voxel, then quantum noise on top (the noise is what the scanner adds).
    image = ndimage.gaussian_filter(canvas.image, sigma=p["blur_vox"], mode="nearest")
    image += p["noise_hu"] * acquisition
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    label = canvas.label
    # The internal arrays are RAS-ordered; store them LPS-ordered like DICOM-derived NIfTI.
    image = np.ascontiguousarray(image[::-1, ::-1, :])
    label = np.ascontiguousarray(label[::-1, ::-1, :])
    offset = (p["origin"][0], p["origin"][1], p["origin"][2])
    return image, label, phantom_affine(size, offset, fov)


if __name__ == "__main__":  # the command line is the dataset writer's
    from data.phantom_dataset import main

    sys.exit(main())
