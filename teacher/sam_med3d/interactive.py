"""Interactive SAM-Med3D teacher (one binary target, clicks), the ``segment_fn`` adapter for
``evaluation.clicks.click_protocol``, and the click-training step of ``teacher.train``.

Clicks follow the SAM-Med3D paper: every call gets all clicks so far, and the previous prediction's
low-resolution logits (32³) are fed back as the dense mask prompt. Training teaches both situations
(``interactive_training_loss``): a first prediction from clicks alone, and a correction, where the previous
logits come back as mask prompt together with one more click on an error.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from teacher.sam_med3d.model import SamMed3D
from teacher.sam_med3d.preprocess import crop_or_pad, paste_window, zscore_foreground

# Share of click batches trained as a correction (previous logits + one more click) rather than a first
# prediction: the evaluation protocol's first click is the one case, its 2nd..10th clicks the other.
CORRECTION_FRACTION = 0.5


class SamMed3DTeacher(nn.Module):
    """Point-prompted SAM-Med3D for one target.

    Args:
        sam: a ``SamMed3D`` (e.g. ``build_sam_med3d(checkpoint)``).
    """

    def __init__(self, sam: SamMed3D) -> None:
        super().__init__()
        self.sam = sam

    def low_res_logits(
        self,
        image_embeddings: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor],
        prev_mask_logits: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Decode clicks on precomputed embeddings.

        Args:
            image_embeddings: ``B x C x 8³`` from ``sam.image_encoder``.
            points: ``(coords B x N x 3, labels B x N)`` in crop voxels (X, Y, Z), labels 1/0/-1.
            prev_mask_logits: previous logits, low-res ``B x 1 x 32³`` or full-res ``B x 1 x 128³``
                (resized trilinearly to 32³, as SAM-Med3D does), or None for the first click.

        Returns:
            ``B x 1 x 32³`` logits.
        """
        if prev_mask_logits is not None and tuple(prev_mask_logits.shape[2:]) != self.sam.low_res_size:
            prev_mask_logits = F.interpolate(
                prev_mask_logits.float(), size=self.sam.low_res_size, mode="trilinear", align_corners=False
            )
        logits, _ = self.sam.decode(image_embeddings, points, prev_mask_logits)
        return logits

    def forward(
        self,
        image: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor],
        prev_mask_logits: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Image ``B x 1 x 128³`` (preprocessed) and clicks → full-resolution logits ``B x 1 x 128³``
        (the decoder's 32³ logits upsampled ×4 trilinearly). See ``low_res_logits`` for the prompts."""
        low = self.low_res_logits(self.sam.image_encoder(image), points, prev_mask_logits)
        return F.interpolate(low, size=image.shape[2:], mode="trilinear", align_corners=False)


class SamMed3DClickSegmenter:
    """``segment_fn(image, coords (N, 3), labels (N,)) -> binary mask`` for the click protocol.

    The image may be any size: a 128³ window centred on the first click is cut (padded where the volume
    is smaller), the prediction is pasted back and the mask is 0 outside the window; clicks outside it
    are ignored. The encoder runs once per window, and when a call's clicks extend the previous call's
    clicks, the previous low-res logits are fed back (the paper's iterative protocol).

    Args:
        teacher: a ``SamMed3DTeacher``.
        zscore: z-score the whole input volume over voxels > 0 first (SAM-Med3D preprocessing); False
            when the caller's image is already normalised.
        threshold: logit threshold of the binary mask.
    """

    def __init__(self, teacher: SamMed3DTeacher, zscore: bool = False, threshold: float = 0.0) -> None:
        self.teacher = teacher.eval()
        self.zscore = zscore
        self.threshold = threshold
        self._window: Optional[torch.Tensor] = None
        self._embeddings: Optional[torch.Tensor] = None
        self._clicks: Optional[tuple[np.ndarray, np.ndarray]] = None
        self._low_res: Optional[torch.Tensor] = None

    def _param(self) -> torch.Tensor:
        return next(self.teacher.parameters())

    @torch.no_grad()
    def __call__(self, image: np.ndarray | torch.Tensor, coords: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Args:
            image: ``X x Y x Z`` or ``1 x X x Y x Z``.
            coords: ``N x 3`` voxel coordinates (X, Y, Z); the first click fixes the window.
            labels: ``N``: 1 positive, 0 negative.

        Returns:
            bool mask ``X x Y x Z``.
        """
        vol = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if vol.ndim == 4 and vol.shape[0] == 1:
            vol = vol[0]
        if vol.ndim != 3:
            raise ValueError(f"segment_fn expects an X x Y x Z (or 1 x X x Y x Z) image, got shape {np.shape(image)}")
        coords = np.asarray(coords, dtype=np.float32).reshape(-1, 3)
        labels = np.asarray(labels).reshape(-1)
        if len(coords) == 0 or len(coords) != len(labels):
            raise ValueError(f"need >= 1 click with one label each, got {len(coords)} coords, {len(labels)} labels")
        if self.zscore:
            vol = zscore_foreground(vol)
        roi = (self.teacher.sam.img_size,) * 3
        window, origin = crop_or_pad(vol.astype(np.float32), roi, center=coords[0])
        param = self._param()
        window_t = torch.from_numpy(window).to(param.device, param.dtype)[None, None]
        if self._window is None or self._window.shape != window_t.shape or not torch.equal(self._window, window_t):
            self._window, self._embeddings = window_t, self.teacher.sam.image_encoder(window_t)
            self._clicks, self._low_res = None, None

        local = coords - np.asarray(origin, dtype=np.float32)
        inside = np.all((local >= 0) & (local < np.asarray(roi)), axis=1)
        continues = (
            self._clicks is not None
            and len(coords) > len(self._clicks[0])
            and np.array_equal(coords[: len(self._clicks[0])], self._clicks[0])
            and np.array_equal(labels[: len(self._clicks[1])], self._clicks[1])
        )
        prev = self._low_res if continues else None
        pts = (
            torch.from_numpy(local[inside]).to(param.device)[None],
            torch.from_numpy(labels[inside].astype(np.int64)).to(param.device)[None],
        )
        low = self.teacher.low_res_logits(self._embeddings, pts, prev)
        self._clicks, self._low_res = (coords.copy(), labels.copy()), low
        full = F.interpolate(low, size=roi, mode="trilinear", align_corners=False)[0, 0]
        mask = (full > self.threshold).cpu().numpy()
        return paste_window(mask, origin, vol.shape, fill=False)


def interactive_training_loss(
    model: nn.Module,
    image: torch.Tensor,
    label: torch.Tensor,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    max_positive: int = 3,
    max_negative: int = 2,
) -> torch.Tensor:
    """One click-training step of a ``SamMed3DAutoTeacher`` (or its DDP wrapper) on a batch of crops.

    Clicks and the binary target come from ``teacher.point_sampling.sample_clicks`` (one organ per crop).
    With probability ``CORRECTION_FRACTION`` (global RNG, so a resumed run draws the same) the step is a
    correction: a first prediction without gradient, one more click drawn from its errors
    (``sample_correction_clicks``), and the loss on the prediction from all clicks with the first
    prediction's low-res logits as mask prompt; otherwise the loss is on the prediction from the clicks alone.

    Args:
        model: called as ``model(image, points=..., use_auto_prompt=False, mask_inputs=..., low_res=...)``.
        image: ``B x 1 x S³`` crops.
        label: ``B x 1 x S³`` integer labels.
        loss: binary loss on (logits ``B x 1 x S³``, target ``B x 1 x S³`` float), e.g. a sigmoid DiceCE.
        max_positive: most positive clicks per crop.
        max_negative: most negative clicks per crop.

    Returns:
        the scalar loss.
    """
    from teacher.point_sampling import sample_clicks, sample_correction_clicks

    clicks = sample_clicks(label, max_positive, max_negative)
    target = (clicks.target > 0).float()
    coords, labels, previous = clicks.coords, clicks.labels, None
    if bool(torch.rand(()) < CORRECTION_FRACTION):
        with torch.no_grad():
            previous = model(image, points=(coords, labels), use_auto_prompt=False, low_res=True)
        first = F.interpolate(previous.float(), size=image.shape[2:], mode="trilinear", align_corners=False) > 0
        extra_coords, extra_labels = sample_correction_clicks(first, target.bool())
        coords, labels = torch.cat([coords, extra_coords], dim=1), torch.cat([labels, extra_labels], dim=1)
    logits = model(image, points=(coords, labels), use_auto_prompt=False, mask_inputs=previous)
    return loss(logits.float(), target)
