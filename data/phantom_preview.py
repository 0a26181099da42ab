"""A contact sheet of phantom cases for a quick look: axial and coronal slices with the labels overlaid."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from data.atomic import atomic_path


def _to_ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return nib.orientations.apply_orientation(array, nib.orientations.io_orientation(affine))


def render_preview(cases: Sequence[tuple], labels: dict[int, str], path: str | Path) -> Path:
    """Write a contact sheet: per case three axial slices and one coronal slice, labels overlaid.

    Args:
        cases: tuples (case_id, image (X, Y, Z), label (X, Y, Z) or None, affine).
        labels: ``{id: name}`` for the legend.
        path: PNG to write (atomically).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colours = plt.get_cmap("tab10").colors
    cmap = ListedColormap([(0, 0, 0, 0)] + [(*colours[(k - 1) % 10], 1.0) for k in range(1, max(labels) + 1)])
    rows = len(cases)
    fig, axes = plt.subplots(rows, 4, figsize=(13, 3.2 * rows), squeeze=False)
    for r, (case_id, image, label, affine) in enumerate(cases):
        img = _to_ras(image, affine).astype(np.float32)
        lab = _to_ras(label, affine) if label is not None else None
        zooms = np.abs(np.diag(affine)[:3])
        nz = img.shape[2]
        for c, frac in enumerate((0.38, 0.55, 0.72)):
            k = int(frac * (nz - 1))
            # Radiological view: patient's right on the left of the picture, anterior up.
            axes[r, c].imshow(img[::-1, :, k].T, cmap="gray", vmin=-175, vmax=250, origin="lower",
                              aspect=zooms[1] / zooms[0])
            if lab is not None:
                axes[r, c].imshow(lab[::-1, :, k].T, cmap=cmap, vmin=0, vmax=max(labels), alpha=0.35,
                                  origin="lower", interpolation="nearest", aspect=zooms[1] / zooms[0])
            axes[r, c].set_title(f"{case_id} axial z={k}", fontsize=8)
        j = int(0.45 * (img.shape[1] - 1))
        axes[r, 3].imshow(img[::-1, j, :].T, cmap="gray", vmin=-175, vmax=250, origin="lower",
                          aspect=zooms[2] / zooms[0])
        if lab is not None:
            axes[r, 3].imshow(lab[::-1, j, :].T, cmap=cmap, vmin=0, vmax=max(labels), alpha=0.35, origin="lower",
                              interpolation="nearest", aspect=zooms[2] / zooms[0])
        axes[r, 3].set_title(f"{case_id} coronal y={j}", fontsize=8)
        for ax in axes[r]:
            ax.set_axis_off()
    handles = [Patch(color=cmap(k), label=f"{k} {name}") for k, name in labels.items() if k]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return Path(path)

