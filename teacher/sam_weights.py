"""Checkpoints: official SAM weights into the 3D teacher, and our own ``teacher.pt`` (docs/interfaces.md).

SAM -> teacher mapping (keys identical under ``image_encoder.``):

- ``patch_embed.proj.*``: copied; the 1-channel CT slice feeds R, G and B, so the folded 3D conv sums the
  weight over its input channels (see :mod:`teacher.patch_embed`).
- ``pos_embed`` (1 x 64 x 64 x C): copied at its own size; average-pooled to the token grid at run time.
- ``blocks.i.{norm1,norm2,attn.qkv,attn.proj,mlp.lin1,mlp.lin2}.*``: copied.
- ``blocks.i.attn.rel_pos_{h,w}`` (2*14-1 or 2*64-1 x head_dim): linearly resized to 2*8-1 (exactly SAM's own
  ``get_rel_pos`` resizing) and used along X and Y; the new ``rel_pos_d`` (Z) starts at their mean.
- Not reused: SAM's 2D ``image_encoder.neck.*``, ``prompt_encoder.*``, ``mask_decoder.*`` (reported as ignored).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F

PREFIX = "image_encoder."
# Parts of an official checkpoint that the 3D teacher deliberately does not reuse.
IGNORED_PREFIXES = ("image_encoder.neck.", "prompt_encoder.", "mask_decoder.")


class SamCheckpointError(ValueError):
    """A SAM checkpoint that does not fit the teacher (missing key, wrong shape, unexpected key)."""


@dataclass
class SamLoadReport:
    """What :func:`load_sam_state_dict` did.

    Attributes:
        loaded: teacher parameter names filled from the checkpoint.
        resized: ``{name: (checkpoint shape, teacher shape)}`` for tables that were resized.
        ignored: checkpoint keys deliberately not used (SAM's 2D neck, prompt encoder, mask decoder).
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"SAM weights from {self.source}: {len(self.loaded)} tensors loaded, {len(self.resized)} resized, "
            f"{len(self.ignored)} ignored (2D neck / prompt encoder / mask decoder)"
        )


def resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly resize a relative-position table ``L x d`` to ``length x d`` (SAM's ``get_rel_pos`` rule)."""
    if table.shape[0] == length:
        return table.clone()
    resized = F.interpolate(table.float().t()[None], size=length, mode="linear")
    return resized[0].t().to(table.dtype)


def read_state_dict(source: str | Path | Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Load a checkpoint file (or take a mapping) and return ``(state_dict, description)``."""
    if isinstance(source, Mapping):
        state, name = dict(source), "<state dict>"
    else:
        path = Path(source)
        if not path.is_file():
            raise SamCheckpointError(f"SAM checkpoint not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt or not a torch file: say which file
            raise SamCheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({exc})") from exc
        name = str(path)
        if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
            state = dict(state["model"])
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SamCheckpointError(f"{name}: expected a state dict of tensors")
    if not any(k.startswith(PREFIX) for k in state):
        # A bare ImageEncoderViT state dict: give it the prefix of a full SAM checkpoint.
        state = {PREFIX + k: v for k, v in state.items()}
    return state, name


def load_sam_state_dict(source: str | Path | Mapping[str, torch.Tensor], model: torch.nn.Module) -> SamLoadReport:
    """Copy official SAM image-encoder weights into a :class:`teacher.model.Teacher3D` and freeze them (PEFT).

    Every reused key must be present with a compatible shape, and every ``image_encoder.*`` key except SAM's 2D
    neck must be used; otherwise :class:`SamCheckpointError` names the key and the shapes.

    Args:
        source: path to ``sam_vit_b_01ec64.pth`` (plain state dict) or a state dict.
        model: the teacher to fill in place.

    Returns:
        a :class:`SamLoadReport`.
    """
    state, name = read_state_dict(source)
    encoder = model.image_encoder
    params = dict(encoder.named_parameters())
    report = SamLoadReport(source=name)
    missing = [PREFIX + k for k in encoder.sam_keys() if PREFIX + k not in state]
    if missing:
        raise SamCheckpointError(f"{name}: missing {len(missing)} SAM keys, e.g. {missing[:5]}")
    expected = {PREFIX + k for k in encoder.sam_keys()}
    unexpected = [k for k in state if k not in expected and not k.startswith(IGNORED_PREFIXES)]
    if unexpected:
        raise SamCheckpointError(
            f"{name}: {len(unexpected)} keys the teacher cannot place (wrong preset/depth?), e.g. {unexpected[:5]}"
        )
    report.ignored = sorted(k for k in state if k.startswith(IGNORED_PREFIXES))

    with torch.no_grad():
        for key in encoder.sam_keys():
            src = state[PREFIX + key]
            dst = params[key]
            if key == "pos_embed":
                if src.ndim != 4 or src.shape[0] != 1 or src.shape[3] != dst.shape[3]:
                    raise _shape_error(name, key, src, dst)
                if src.shape != dst.shape:
                    report.resized[key] = (tuple(src.shape), tuple(dst.shape))
                    dst.data = torch.empty_like(src, dtype=dst.dtype)  # the table is pooled at run time: keep its size
                dst.copy_(src)
            elif key.endswith(("rel_pos_h", "rel_pos_w")):
                if src.ndim != 2 or src.shape[1] != dst.shape[1]:
                    raise _shape_error(name, key, src, dst)
                if src.shape != dst.shape:
                    report.resized[key] = (tuple(src.shape), tuple(dst.shape))
                dst.copy_(resize_rel_pos(src, dst.shape[0]))
            else:
                if src.shape != dst.shape:
                    raise _shape_error(name, key, src, dst)
                dst.copy_(src)
            report.loaded.append(f"{PREFIX}{key}")
        for block in encoder.blocks:
            attn = block.attn
            attn.rel_pos_d.copy_(0.5 * (attn.rel_pos_h + attn.rel_pos_w))
    model.configure_trainable(pretrained=True)
    return report


def _shape_error(name: str, key: str, src: torch.Tensor, dst: torch.Tensor) -> SamCheckpointError:
    return SamCheckpointError(
        f"{name}: {PREFIX}{key} has shape {tuple(src.shape)}, the teacher expects {tuple(dst.shape)} "
        "(checkpoint from another SAM size than teacher.preset?)"
    )
