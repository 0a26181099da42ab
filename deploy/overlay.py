"""A quick-look PNG: a few axial slices of the CT with the mask drawn over it.

matplotlib is optional on an edge device; it is imported only when an overlay is asked for.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
from nibabel import orientations

from deploy.files import atomic_path
from deploy.errors import DeployError


def write_overlay(path: str | Path, image: np.ndarray, labels: np.ndarray, affine: np.ndarray,
                  class_names: Mapping[int, str] | None = None, slices: int = 4, hu_window: tuple[float, float] = (-175.0, 250.0)) -> Path:
    """Save axial slices (RAS, through the mask's extent) with the labels in colour.

    Args:
        path: PNG destination.
        image: ``X x Y x Z`` CT in the file's voxel order (HU).
        labels: ``X x Y x Z`` class indices, same grid.
        affine: the file's affine (used to show slices the radiological way up).
        class_names: ``{id: name}`` for the legend.
        slices: number of axial slices.
        hu_window: grey-level window.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise DeployError("--overlay needs matplotlib (pip install matplotlib); the mask itself was written") from exc
    to_ras = orientations.ornt_transform(orientations.io_orientation(affine), orientations.axcodes2ornt("RAS"))
    image = orientations.apply_orientation(image, to_ras)
    labels = orientations.apply_orientation(labels, to_ras)
    z_with_mask = np.nonzero(labels.reshape(-1, labels.shape[2]).any(axis=0))[0]
    lo, hi = (z_with_mask[0], z_with_mask[-1]) if z_with_mask.size else (0, labels.shape[2] - 1)
    zs = np.unique(np.linspace(lo, hi, slices + 2)[1:-1].round().astype(int)) if hi > lo else np.array([lo])
    num_classes = max(int(labels.max()) + 1, 2)
    cmap = plt.get_cmap("tab10" if num_classes <= 10 else "tab20", num_classes)
    fig, axes = plt.subplots(1, len(zs), figsize=(3.2 * len(zs), 3.4), squeeze=False)
    for ax, z in zip(axes[0], zs):
        # RAS: rows anterior-to-posterior, columns patient's right on the viewer's left (radiological).
        ax.imshow(np.clip(image[:, :, z], *hu_window).T, cmap="gray", origin="lower")
        masked = np.ma.masked_equal(labels[:, :, z].T, 0)
        ax.imshow(masked, cmap=cmap, vmin=0, vmax=num_classes - 1, alpha=0.45, origin="lower", interpolation="nearest")
        ax.set_title(f"z = {z}")
        ax.axis("off")
    present = [int(c) for c in np.unique(labels) if c != 0]
    if class_names and present:
        handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(c)) for c in present]
        fig.legend(handles, [class_names.get(c, str(c)) for c in present], loc="lower center", ncol=min(len(present), 7), fontsize=8)
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path
