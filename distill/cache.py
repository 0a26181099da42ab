"""Teacher-output cache: the teacher's soft targets computed once per case, stored compactly.

The teacher is the expensive model; a student trains for many steps on random crops of the same few
volumes. So the teacher runs once over every training case (labelled and unlabelled), on the whole
preprocessed volume with the same sliding window used for evaluation, and its logits are stored as
float16 at ``1 / downsample`` resolution per axis (default 2: 1/8 of the voxels, 1/16 of the float32
bytes). Logits are smooth at the scale of a voxel pair (they come out of a decoder that upsamples ×2
twice), so a trilinear upsample restores them closely; ``tests/test_distill_cache.py`` and the report
measure the agreement.

A teacher whose logits are natively coarser than its input (SAM-Med3D: ``forward_low_res`` gives 32³ per
128³ window, ``low_res_factor`` 4; 2 for the ``small``/``tiny`` presets) is cached at that native grid
instead, whatever ``downsample`` says: the sliding window runs on the native logits (windows placed as
``evaluation.sliding_window`` places them, their starts aligned to the factor), they are blended there and
stored as float16; at load they are upsampled ×factor trilinearly and cropped to the case's grid, which is
what the teacher's own ``forward`` does per window. Nothing finer would be information, and nothing coarser
is needed. The manifest records ``storage.native_factor`` and, per case, ``native_offset`` (voxels of
padding before the case on each axis, where a case is smaller than the ROI).

Layout::

    <cache_root>/<key>/manifest.json       key inputs, storage format, one entry per case
    <cache_root>/<key>/<case_id>.npz        {"logits": float16 K x x' x y' x z'}

``key`` is a sha256 of the teacher checkpoint file's bytes, the preprocessing spec, the body crop of
``data.transforms`` (``BODY_THRESHOLD_HU``, ``BODY_CROP_MARGIN``: they decide the grid the teacher sees), the
ROI, the overlap and the storage format: a retrained teacher or a changed preprocessing lands in a new folder
and never serves stale targets. Within a folder each entry records the sha256 of the case's image file
(``image_sha256``): ``build_teacher_cache`` recomputes an entry whose file has changed since, and
``AttachTeacherd`` refuses one (each file is hashed once, when the transform is made, not per crop). Every
file is written atomically; the manifest is rewritten after each case, so a killed build resumes where it
stopped.

At training time ``AttachTeacherd`` loads an entry, upsamples it to the case's preprocessed grid and puts
it under ``"teacher"`` so that ``data.transforms.random_crop_transforms(..., extra_keys=("teacher",))``
crops and flips image, label and teacher identically.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import MapTransform
from torch.nn import functional as F

from data.atomic import atomic_path, file_sha256, write_json_atomic
from data.transforms import body_crop_spec

# 2: entries record the image file's sha256 (``image_sha256``, ``image``), the manifest the body crop.
CACHE_FORMAT_VERSION = 2
# A case item's key for its image file's sha256, when the caller has it already. Not "image_...": MONAI takes
# every "<key>_*" entry of a data dict for that key's metadata dict.
SOURCE_HASH_KEY = "source_sha256"
_CASE_ID = re.compile(r"^[A-Za-z0-9._-]+$")


class CacheError(ValueError):
    """A cache folder or entry that cannot be used; the message names the folder, case or file."""


def cache_key(
    teacher_sha256: str,
    preprocess: Mapping[str, Any],
    roi_size: Sequence[int],
    overlap: float,
    downsample: int = 2,
    native: bool = False,
    body_crop: Mapping[str, Any] | None = None,
) -> str:
    """Folder name for a cache: everything that changes the stored targets goes into the hash.

    Args:
        teacher_sha256: sha256 of the teacher checkpoint file.
        preprocess: preprocessing spec (docs/interfaces.md).
        roi_size: teacher sliding-window ROI ``[X, Y, Z]``.
        overlap: sliding-window overlap.
        downsample: storage downsampling factor per axis.
        native: the logits are the teacher's native low-res grid (``downsample`` is its factor).
        body_crop: the body crop of the loading transforms; None: ``body_crop_spec()`` (the defaults).
    """
    fields = {
        "format": CACHE_FORMAT_VERSION,
        "teacher_sha256": teacher_sha256,
        "preprocess": preprocess,
        "body_crop": dict(body_crop) if body_crop is not None else body_crop_spec(),
        "roi_size": [int(r) for r in roi_size],
        "overlap": float(overlap),
        "downsample": int(downsample),
        "dtype": "float16",
    }
    if native:  # only then: the keys of existing caches stay what they were
        fields["native"] = True
    blob = json.dumps(
        fields,
        sort_keys=True,
        default=str,
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def compress_logits(logits: torch.Tensor, downsample: int) -> np.ndarray:
    """Average-pool ``K x X x Y x Z`` logits by ``downsample`` per axis (ceil) and cast to float16."""
    logits = torch.as_tensor(logits).float()
    if downsample > 1:
        out_size = [-(-s // downsample) for s in logits.shape[1:]]
        logits = F.adaptive_avg_pool3d(logits[None], out_size)[0]
    return logits.cpu().numpy().astype(np.float16)


def expand_logits(stored: np.ndarray, shape: Sequence[int], native_factor: int | None = None,
                  native_offset: Sequence[int] = (0, 0, 0)) -> torch.Tensor:
    """Upsample stored ``K x x' x y' x z'`` logits back to ``K x X x Y x Z`` float32 (trilinear).

    Args:
        stored: the cached logits.
        shape: the case's grid ``[X, Y, Z]``.
        native_factor: for natively low-res logits (:func:`predict_native_logits`): upsample by exactly the
            factor, as the teacher does, then crop ``shape`` from ``native_offset``; None: resize to ``shape``.
        native_offset: padding voxels before the case on each axis (native logits only).
    """
    t = torch.from_numpy(np.asarray(stored, dtype=np.float32))
    shape = [int(s) for s in shape]
    if native_factor:
        up = F.interpolate(t[None], size=[s * int(native_factor) for s in t.shape[1:]], mode="trilinear",
                           align_corners=False)[0]
        (ox, oy, oz), (sx, sy, sz) = [int(o) for o in native_offset], shape
        return up[:, ox:ox + sx, oy:oy + sy, oz:oz + sz].contiguous()
    if list(t.shape[1:]) == shape:
        return t
    return F.interpolate(t[None], size=shape, mode="trilinear", align_corners=False)[0]


def native_low_res_factor(teacher: Any) -> int | None:
    """Voxels per native logit of a teacher that predicts on a coarser grid (``forward_low_res`` and
    ``low_res_factor``, e.g. SAM-Med3D), else None."""
    factor = getattr(teacher, "low_res_factor", None)
    if factor is None or not callable(getattr(teacher, "forward_low_res", None)):
        return None
    return int(factor)


def predict_native_logits(
    teacher: torch.nn.Module,
    image: torch.Tensor,
    roi_size: Sequence[int],
    num_classes: int,
    factor: int,
    overlap: float = 0.25,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, list[int]]:
    """Whole-volume logits on the teacher's native grid, and where the volume sits in it.

    MONAI's ``sliding_window_inference`` blends the native ``B x K x roi/f`` window outputs (Gaussian
    weights, as ``evaluation.sliding_window``). The volume is zero-padded to whole native voxels: along an
    axis shorter than the ROI it is centred in one window exactly as ``evaluation.sliding_window`` pads it;
    along a longer axis the pad (< f voxels) goes at the far end and the window step is rounded down to a
    multiple of ``f``, so that every window starts on a native voxel.

    Args:
        teacher: a module with ``forward_low_res(B x 1 x roi) -> B x K x roi/f``, on ``device``.
        image: ``1 x X x Y x Z`` preprocessed volume.
        roi_size: the teacher's window (multiples of ``f``).
        num_classes: K, checked.
        factor: ``f``, the teacher's ``low_res_factor``.
        overlap: wanted window overlap; the step is ``roi·(1−overlap)`` rounded down to a multiple of ``f``.
        device: where the windows run.

    Returns:
        ``(K x P_x/f x P_y/f x P_z/f logits (P: the padded grid), offset [x, y, z] of the volume in P)``;
        ``expand_logits(logits, shape, f, offset)`` gives the case's ``K x X x Y x Z``.
    """
    from monai.inferers import sliding_window_inference

    from evaluation.validation import as_plain_tensor

    f = int(factor)
    roi = [int(r) for r in roi_size]
    if any(r % f for r in roi):
        raise CacheError(f"teacher ROI {roi} is not a multiple of its native factor {f}")
    x = as_plain_tensor(image).float()
    shape = list(x.shape[1:])
    padded = [max(r, -(-s // f) * f) for s, r in zip(shape, roi)]
    offset = [(r - s) // 2 if s < r else 0 for s, r in zip(shape, roi)]
    x = F.pad(x, [p for s, t, o in zip(reversed(shape), reversed(padded), reversed(offset)) for p in (o, t - s - o)])
    # MONAI's step is int(roi·(1−overlap)); ask for one that is a multiple of f (the 0.5 keeps int() exact).
    steps = [max(f, int(r * (1 - overlap)) // f * f) for r in roi]
    overlaps = [1.0 - (step + 0.5) / r if step < r else 0.0 for step, r in zip(steps, roi)]

    def run(patch: torch.Tensor) -> torch.Tensor:
        out = teacher.forward_low_res(patch).float()
        expected = (patch.shape[0], num_classes, *[s // f for s in patch.shape[2:]])
        if tuple(out.shape) != expected:
            raise CacheError(f"teacher gave native logits of shape {tuple(out.shape)}, expected {expected}")
        return out

    with torch.inference_mode():
        low = sliding_window_inference(x[None].to(device), roi_size=roi, sw_batch_size=1, predictor=run,
                                       overlap=overlaps, mode="gaussian", sw_device=device, device=device)[0]
    return low.cpu(), offset


class TeacherCache:
    """One cache folder: read entries, and the manifest describing them.

    Args:
        directory: ``<cache_root>/<key>`` (created by ``build_teacher_cache``).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        manifest_path = self.directory / "manifest.json"
        if not manifest_path.is_file():
            raise CacheError(f"{manifest_path}: no teacher cache manifest here")
        try:
            self.manifest: dict = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise CacheError(f"{manifest_path}: not valid JSON ({exc})") from exc
        if self.manifest.get("format") != CACHE_FORMAT_VERSION:
            raise CacheError(f"{manifest_path}: cache format {self.manifest.get('format')} != {CACHE_FORMAT_VERSION}")

    @property
    def entries(self) -> dict[str, dict]:
        return self.manifest["entries"]

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    def size_bytes(self) -> int:
        """Bytes on disk of all entries (manifest excluded)."""
        return sum((self.directory / e["file"]).stat().st_size for e in self.entries.values())

    def stale_entries(self, cases: Iterable[Mapping[str, Any]] | None = None) -> dict[str, str]:
        """Entries whose image file has changed since they were cached: ``{case_id: why}``.

        Each file is hashed once here. Args:
            cases: items ``{"case_id", "image"}`` (optionally ``SOURCE_HASH_KEY``) giving each case's current
                file; None: the file each entry recorded. Entries without a recorded hash (built from
                in-memory volumes) and files that are not on disk are not checked.
        """
        if cases is None:
            cases = [{"case_id": cid, "image": e.get("image")} for cid, e in self.entries.items()]
        stale = {}
        for item in cases:
            entry = self.entries.get(str(item["case_id"]))
            recorded = (entry or {}).get("image_sha256")
            current = case_image_sha256(item)
            if recorded and current and current != recorded:
                stale[str(item["case_id"])] = (f"{self.directory}: case {item['case_id']!r} was cached from an image "
                                               f"with sha256 {recorded[:16]}…, but {item.get('image')} now has "
                                               f"{current[:16]}… (the image changed; rebuild the cache)")
        return stale

    def load(self, case_id: str, shape: Sequence[int] | None = None, image_sha256: str | None = None) -> torch.Tensor:
        """Teacher logits of one case on its preprocessed grid, ``K x X x Y x Z`` float32.

        Args:
            case_id: the case identifier used when the cache was built.
            shape: the grid the caller holds (the preprocessed image's spatial shape); refused if it is
                not the grid the teacher saw, which means the preprocessing changed.
            image_sha256: sha256 of the case's image file now; refused if the entry recorded another one
                (the image changed since it was cached).
        """
        entry = self.entries.get(case_id)
        if entry is None:
            raise CacheError(f"{self.directory}: no cached teacher output for case {case_id!r}")
        recorded = entry.get("image_sha256")
        if image_sha256 is not None and recorded is not None and image_sha256 != recorded:
            raise CacheError(
                f"{self.directory}: case {case_id!r} was cached from an image with sha256 {recorded[:16]}…, "
                f"but its image now has {image_sha256[:16]}… (the image changed; rebuild the cache)"
            )
        if shape is not None and [int(s) for s in shape] != entry["shape"]:
            raise CacheError(
                f"{self.directory}: case {case_id!r} was cached on grid {entry['shape']}, "
                f"but the image now has grid {[int(s) for s in shape]} (preprocessing changed?)"
            )
        path = self.directory / entry["file"]
        try:
            with np.load(path) as npz:
                stored = npz["logits"]
        except (OSError, KeyError, ValueError) as exc:
            raise CacheError(f"{path}: unreadable teacher cache entry ({exc})") from exc
        return expand_logits(stored, entry["shape"], self.manifest["storage"].get("native_factor"),
                             entry.get("native_offset", (0, 0, 0)))


def store_entry(directory: str | Path, manifest: dict, item: Mapping[str, Any], stored: np.ndarray, grid: Sequence[int],
                image_sha256: str | None, seconds: float = 0.0, extra: Mapping[str, Any] | None = None) -> None:
    """Write one case's stored logits (``K x x' x y' x z'`` float16, e.g. from :func:`compress_logits`) and its
    manifest entry, both atomically; ``grid`` is the case's preprocessed ``[X, Y, Z]``. ``build_teacher_cache``
    stores every teacher prediction through this; targets computed elsewhere (another machine's teacher, or a
    test's reference labels) can be stored the same way into a manifest it created."""
    case_id = str(item["case_id"])
    if not _CASE_ID.match(case_id):
        raise CacheError(f"case id {case_id!r} is not a safe file name")
    directory = Path(directory)
    file_name = f"{case_id}.npz"
    with atomic_path(directory / file_name, suffix=".npz") as tmp:
        np.savez(tmp, logits=np.asarray(stored, dtype=np.float16))
    manifest["entries"][case_id] = {
        "file": file_name,
        "image": str(item["image"]) if isinstance(item.get("image"), (str, Path)) else None,
        "image_sha256": image_sha256,
        "shape": [int(g) for g in grid],
        "stored_shape": [int(v) for v in np.shape(stored)[1:]],
        **dict(extra or {}),
        "bytes": (directory / file_name).stat().st_size,
        "labelled": bool(item.get("label")),
        "seconds": round(float(seconds), 3),
    }
    write_json_atomic(directory / "manifest.json", manifest)


def build_teacher_cache(
    teacher: Callable | torch.nn.Module,
    cases: Iterable[Mapping[str, Any]],
    load_case: Callable[[Mapping[str, Any]], Mapping[str, Any]],
    cache_root: str | Path,
    teacher_checkpoint: str | Path,
    preprocess: Mapping[str, Any],
    roi_size: Sequence[int],
    num_classes: int,
    overlap: float = 0.25,
    downsample: int = 2,
    device: str | torch.device = "cpu",
    progress: bool = True,
    body_crop: Mapping[str, Any] | None = None,
) -> TeacherCache:
    """Run the teacher once over every case and store its logits (skipping cases already cached whose image
    file is unchanged).

    Args:
        teacher: the teacher model (or any predictor ``evaluation.sliding_window.predict_logits`` takes).
        cases: items with ``"case_id"`` and ``"image"`` (path), labelled or not; a ``SOURCE_HASH_KEY`` (the
            file's sha256, e.g. computed by the caller already) saves hashing the file again. The sha256 of
            each image file is recorded per entry; an entry recorded for other bytes is recomputed.
        load_case: the deterministic preprocessing (``data.transforms.load_transforms(spec, keys=("image",))``)
            mapping an item to a dict whose ``"image"`` is ``1 x X x Y x Z``.
        cache_root: parent folder; the cache lives in ``cache_root/<key>``.
        teacher_checkpoint: the teacher checkpoint file (its bytes key the cache).
        preprocess: preprocessing spec (keys the cache, stored in the manifest).
        roi_size: sliding-window ROI of the teacher.
        num_classes: K.
        overlap: sliding-window overlap.
        downsample: storage downsampling per axis (1 = full resolution).
        device: where the teacher runs.
        progress: show a tqdm bar.
        body_crop: the body crop ``load_case`` applies (keys the cache); None: ``body_crop_spec()``, the
            defaults of ``data.transforms.load_transforms``.

    Returns:
        The ``TeacherCache`` holding every case.

    A teacher with native low-res logits (:func:`native_low_res_factor`) is stored at that grid and
    ``downsample`` does not apply (see the module docstring).
    """
    from evaluation.sliding_window import predict_logits
    from tqdm.auto import tqdm

    if int(downsample) < 1:
        raise CacheError(f"downsample must be >= 1, got {downsample}")
    native = native_low_res_factor(teacher)
    if native:
        downsample = native
    teacher_sha = file_sha256(teacher_checkpoint)
    body_crop = dict(body_crop) if body_crop is not None else body_crop_spec()
    key = cache_key(teacher_sha, preprocess, roi_size, overlap, downsample, native=bool(native), body_crop=body_crop)
    directory = Path(cache_root) / key
    manifest_path = directory / "manifest.json"
    if manifest_path.is_file():
        manifest = TeacherCache(directory).manifest
    else:
        manifest = {
            "format": CACHE_FORMAT_VERSION,
            "key": key,
            "teacher_checkpoint": str(teacher_checkpoint),
            "teacher_sha256": teacher_sha,
            "preprocess": dict(preprocess),
            "body_crop": body_crop,
            "roi_size": [int(r) for r in roi_size],
            "overlap": float(overlap),
            "num_classes": int(num_classes),
            "storage": {"dtype": "float16", "downsample": int(downsample), "upsample": "trilinear",
                        "native_factor": native},
            "entries": {},
        }
        write_json_atomic(manifest_path, manifest)

    cases = list(cases)
    hashes = {str(c["case_id"]): case_image_sha256(c) for c in cases}  # each file once per build
    todo = []
    for c in cases:
        entry = manifest["entries"].get(str(c["case_id"]))
        if entry is None:
            todo.append(c)
        elif hashes[str(c["case_id"])] and entry.get("image_sha256") != hashes[str(c["case_id"])]:
            if progress:
                print(f"[cache] case {c['case_id']!r}: {c.get('image')} changed since it was cached; recomputing")
            todo.append(c)
    if isinstance(teacher, torch.nn.Module):
        teacher.eval()
    for item in tqdm(todo, desc="teacher cache", disable=not progress or not todo, mininterval=5):
        case_id = str(item["case_id"])
        if not _CASE_ID.match(case_id):
            raise CacheError(f"case id {case_id!r} is not a safe file name")
        start = time.perf_counter()
        image = load_case(item)["image"]
        extra = {}
        if native:
            low, offset = predict_native_logits(teacher, torch.as_tensor(image), roi_size, num_classes, native, overlap, device)
            grid = [int(s) for s in torch.as_tensor(image).shape[1:]]
            stored, extra = low.numpy().astype(np.float16), {"native_offset": offset}
        else:
            with torch.inference_mode():
                logits = predict_logits(teacher, torch.as_tensor(image), roi_size, num_classes, overlap=overlap, device=device)
            logits = torch.as_tensor(logits)
            if logits.shape[0] != num_classes:
                raise CacheError(f"case {case_id!r}: teacher gave {logits.shape[0]} channels, expected {num_classes}")
            grid = [int(s) for s in logits.shape[1:]]
            stored = compress_logits(logits, int(downsample))
        store_entry(directory, manifest, item, stored, grid, hashes[case_id], time.perf_counter() - start, extra)

    missing = [c["case_id"] for c in cases if c["case_id"] not in manifest["entries"]]
    if missing:  # pragma: no cover - guarded by the loop above
        raise CacheError(f"{directory}: cases missing after build: {missing}")
    return TeacherCache(directory)


def case_image_sha256(item: Mapping[str, Any]) -> str | None:
    """sha256 of a case's image file: ``item[SOURCE_HASH_KEY]`` when given, else the file's; None when the
    image is not a file on disk (an in-memory volume)."""
    if item.get(SOURCE_HASH_KEY):
        return str(item[SOURCE_HASH_KEY])
    image = item.get("image")
    if isinstance(image, (str, Path)) and Path(image).is_file():
        return file_sha256(image)
    return None


class AttachTeacherd(MapTransform):
    """Add the cached teacher logits of a case under ``"teacher"`` (``K x X x Y x Z``, on the image grid).

    For an unlabelled case (``has_label`` false or no ``label`` key) the teacher's argmax is also written
    under ``label``: the class-balanced crop sampler needs a label map to choose crop centres, and the
    teacher's is the best one there is. ``has_label`` stays false, so the KD loss never trains on it.

    An entry whose image file has changed since it was cached is refused (``CacheError``): the files the
    entries recorded are hashed once, here, when the transform is made (``check_images``), never per crop;
    a case dict that carries ``SOURCE_HASH_KEY`` is also checked against its entry.

    Args:
        cache: the teacher cache.
        image_key: key of the preprocessed image ``1 x X x Y x Z``.
        teacher_key: key to write the logits under.
        label_key: key of the label map.
        check_images: hash the entries' image files now and refuse the entries whose file changed.
    """

    def __init__(
        self, cache: TeacherCache, image_key: str = "image", teacher_key: str = "teacher", label_key: str = "label",
        check_images: bool = True,
    ) -> None:
        super().__init__(keys=[image_key])
        self.cache = cache
        self.image_key = image_key
        self.teacher_key = teacher_key
        self.label_key = label_key
        self.stale = cache.stale_entries() if check_images else {}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        image = d[self.image_key]
        case_id = str(d["case_id"])
        if case_id in self.stale:
            raise CacheError(self.stale[case_id])
        teacher = self.cache.load(case_id, image.shape[1:], image_sha256=d.get(SOURCE_HASH_KEY))
        d[self.teacher_key] = teacher
        labelled = bool(d.get("has_label", self.label_key in d))
        if not labelled:
            d[self.label_key] = teacher.argmax(dim=0, keepdim=True).to(torch.uint8)
        d["has_label"] = labelled
        return d
