"""One sliding-window prediction for every predictor: torch modules and numpy callables (ONNX Runtime, ...).

All models are scored through the same MONAI ``sliding_window_inference`` (same windows, same Gaussian
blending, same padding), so a Dice difference between teacher, student and exported student is the
model's, not the inference code's.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from data.atomic import atomic_path
from data.transforms import IMAGE_PAD_VALUE, val_transforms
from deploy.volume_io import label_dtype

NumpyPredictor = Callable[[np.ndarray], np.ndarray]
Predictor = Union[torch.nn.Module, NumpyPredictor]
ArrayLike = Union[np.ndarray, torch.Tensor]


class SlidingWindowError(ValueError):
    """An image, ROI, predictor output or preprocessing spec that the sliding window cannot use."""


def predict_logits(
    predictor: Predictor,
    image: ArrayLike,
    roi_size: Sequence[int],
    num_classes: int,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    mode: str = "gaussian",
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> ArrayLike:
    """Logits of a whole volume, predicted window by window and blended.

    Args:
        predictor: a ``torch.nn.Module`` mapping ``B x C x roi`` to ``B x K x roi`` logits (run in eval
            mode under ``torch.inference_mode``; its train/eval state is restored afterwards; it must
            already live on ``device``), or any callable on float32 numpy arrays with the same shapes,
            e.g. a wrapper around an ONNX Runtime session.
        image: ``C x X x Y x Z`` preprocessed volume, numpy or torch.
        roi_size: window size ``[X, Y, Z]`` the predictor accepts. Volumes smaller than it are padded with
            ``data.transforms.IMAGE_PAD_VALUE`` (what training crops are padded with) and the result cropped back.
        num_classes: K, the number of output channels (background included); checked on every window.
        overlap: fraction of overlap between neighbouring windows along each axis, in ``[0, 1)``.
        sw_batch_size: windows per predictor call.
        mode: window blending, ``"gaussian"`` (down-weights window edges) or ``"constant"``.
        device: where the windows are run and blended.
        progress: show a progress bar over windows.

    Returns:
        ``K x X x Y x Z`` float32 logits, numpy if ``image`` is numpy, else a tensor on ``image``'s device.
    """
    x = _as_image_tensor(image)
    roi = _check_roi(roi_size)
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise SlidingWindowError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not 0.0 <= float(overlap) < 1.0:
        raise SlidingWindowError(f"overlap must be in [0, 1), got {overlap}")
    if mode not in ("gaussian", "constant"):
        raise SlidingWindowError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
    if sw_batch_size < 1:
        raise SlidingWindowError(f"sw_batch_size must be >= 1, got {sw_batch_size}")

    if isinstance(predictor, torch.nn.Module):
        run_window = _module_window_fn(predictor, int(num_classes))
        state = _eval_mode(predictor)
    elif callable(predictor):
        run_window = _numpy_window_fn(predictor, int(num_classes))
        state = contextlib.nullcontext()
    else:
        raise SlidingWindowError(f"predictor must be a torch.nn.Module or a callable, got {type(predictor).__name__}")

    with state, torch.inference_mode():
        logits = sliding_window_inference(
            x[None],
            roi_size=roi,
            sw_batch_size=int(sw_batch_size),
            predictor=run_window,
            overlap=float(overlap),
            mode=mode,
            padding_mode="constant",
            cval=IMAGE_PAD_VALUE,
            sw_device=device,
            device=device,
            progress=progress,
        )[0]
    if isinstance(image, np.ndarray):
        return logits.detach().cpu().numpy().astype(np.float32, copy=False)
    return logits.to(image.device)


def predict_labels(
    predictor: Predictor,
    image: ArrayLike,
    roi_size: Sequence[int],
    num_classes: int,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    mode: str = "gaussian",
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> ArrayLike:
    """Integer label map of a whole volume: the argmax of :func:`predict_logits` (same arguments).

    Returns:
        ``X x Y x Z`` labels: numpy ``uint8`` (``int16`` beyond 256 classes) for a numpy image, an
        ``int64`` tensor for a tensor image.
    """
    logits = predict_logits(predictor, image, roi_size, num_classes, overlap, sw_batch_size, mode, device, progress)
    if isinstance(logits, np.ndarray):
        return logits.argmax(axis=0).astype(label_dtype(num_classes))
    return logits.argmax(dim=0)


def predict_case(
    predictor: Predictor,
    image_path: str | Path,
    spec: Mapping[str, Any],
    roi_size: Sequence[int],
    labels: Mapping[int, str],
    out_path: str | Path | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    mode: str = "gaussian",
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Segment a CT NIfTI on disk and return (and optionally write) the mask in the input's own geometry.

    The image goes through ``data.transforms.val_transforms(spec)`` (the preprocessing stored in every
    checkpoint, see docs/interfaces.md: RAS, resampled to ``spec["spacing_mm"]``, cropped to the body,
    intensity per spec), is predicted with :func:`predict_labels`, and the label map is mapped back
    through the same transforms (MONAI ``Invertd``, nearest neighbour) to the input's voxel grid: the
    mask has the input's exact shape, and the written NIfTI the input's exact affine.

    Args:
        predictor: as in :func:`predict_logits`.
        image_path: a 3D NIfTI (``.nii`` / ``.nii.gz``).
        spec: preprocessing spec ``{"spacing_mm", "orientation", "intensity": {...}}``.
        roi_size: the predictor's window ``[X, Y, Z]``.
        labels: ``{class_id: name}`` including background; K is the largest id + 1.
        out_path: if given, the mask is written there atomically as a NIfTI.
        overlap: window overlap, as in :func:`predict_logits`.
        sw_batch_size: windows per predictor call.
        mode: window blending.
        device: where the windows run.

    Returns:
        ``X x Y x Z`` integer mask aligned with the input file's voxels.
    """
    import nibabel as nib
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    image_path = Path(image_path)
    if not image_path.is_file():
        raise SlidingWindowError(f"{image_path}: no such image file")
    try:
        source = nib.load(str(image_path))
    except Exception as exc:  # nibabel raises several unrelated types for unreadable files
        raise SlidingWindowError(f"{image_path}: not a readable NIfTI ({exc})") from exc
    if len(source.shape) != 3:
        raise SlidingWindowError(f"{image_path}: expected a 3D volume, got shape {source.shape}")
    try:
        num_classes = max(int(k) for k in labels) + 1
    except (TypeError, ValueError) as exc:
        raise SlidingWindowError(f"labels must map integer class ids to names, got {labels!r}") from exc

    if not isinstance(spec, Mapping):
        raise SlidingWindowError(f"preprocessing spec must be a mapping, got {type(spec).__name__}")
    # The very preprocessing the models were validated with (it crops to the body; Invertd pads back).
    transform = val_transforms(dict(spec), keys=("image",))
    data = transform({"image": str(image_path)})
    image = data["image"]
    label_map = predict_labels(predictor, image, roi_size, num_classes, overlap, sw_batch_size, mode, device)
    data["pred"] = MetaTensor(
        label_map[None].to(torch.float32).cpu(), meta=dict(image.meta), applied_operations=list(image.applied_operations)
    )
    inverted = Invertd(keys="pred", transform=transform, orig_keys="image", nearest_interp=True)(data)["pred"]
    mask = np.rint(np.asarray(inverted.detach().cpu())[0]).astype(label_dtype(num_classes))
    if mask.shape != tuple(source.shape):
        raise SlidingWindowError(
            f"{image_path}: inverted mask shape {mask.shape} differs from the input's {tuple(source.shape)}"
        )
    if out_path is not None:
        header = source.header.copy()
        header.set_data_dtype(mask.dtype)
        header.set_slope_inter(1.0, 0.0)
        with atomic_path(out_path, suffix=".nii.gz" if str(out_path).endswith(".gz") else ".nii") as tmp:
            nib.save(nib.Nifti1Image(mask, source.affine, header), str(tmp))
    return mask


def _as_image_tensor(image: ArrayLike) -> torch.Tensor:
    if isinstance(image, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    elif isinstance(image, torch.Tensor):
        x = image.to(torch.float32)
    else:
        raise SlidingWindowError(f"image must be a numpy array or a torch tensor, got {type(image).__name__}")
    if x.ndim != 4:
        raise SlidingWindowError(f"image must be C x X x Y x Z, got shape {tuple(x.shape)}")
    return x


def _check_roi(roi_size: Sequence[int]) -> tuple[int, int, int]:
    roi = tuple(int(r) for r in roi_size)
    if len(roi) != 3 or any(r < 1 for r in roi) or any(int(r) != r for r in roi_size):
        raise SlidingWindowError(f"roi_size must be 3 positive integers [X, Y, Z], got {roi_size!r}")
    return roi  # type: ignore[return-value]


def _check_window_output(out: torch.Tensor, patch: torch.Tensor, num_classes: int) -> torch.Tensor:
    expected = (patch.shape[0], num_classes, *patch.shape[2:])
    if tuple(out.shape) != expected:
        raise SlidingWindowError(
            f"predictor returned shape {tuple(out.shape)} for a window of shape {tuple(patch.shape)}; "
            f"expected {expected} (B x K x roi with K = num_classes)"
        )
    return out


def _module_window_fn(module: torch.nn.Module, num_classes: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(patch: torch.Tensor) -> torch.Tensor:
        out = module(patch)
        if not isinstance(out, torch.Tensor):
            raise SlidingWindowError(f"module returned {type(out).__name__}, expected a logits tensor")
        return _check_window_output(out.float(), patch, num_classes)

    return run


def _numpy_window_fn(fn: NumpyPredictor, num_classes: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(patch: torch.Tensor) -> torch.Tensor:
        out = np.asarray(fn(np.ascontiguousarray(patch.detach().cpu().numpy(), dtype=np.float32)))
        return _check_window_output(torch.from_numpy(out.astype(np.float32, copy=False)).to(patch.device), patch, num_classes)

    return run


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    # Put the module in eval mode for prediction but give it back as the caller left it.
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
