"""Architecture hyper-parameters of the 3D-adapted SAM teacher (one frozen dataclass per preset)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class TeacherArch:
    """Every size of the teacher, derived grids excluded: those come from the input at run time.

    Args:
        embed_dim: ViT width C (SAM ViT-B: 768).
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width / C.
        sam_img_size: input size the 2D SAM was trained at; its absolute position table is
            ``sam_img_size / patch_size`` squared (64 x 64 for SAM).
        patch_size: SAM's 2D patch size (16).
        upsample: the reference upsamples the crop by this factor before the 2D patch embedding, so a token
            covers ``patch_size / upsample`` voxels per axis (4).
        window_size: 3D attention window in tokens per axis (8 -> 512 tokens).
        sam_window_size: SAM's 2D window (14); only used to read checkpoints.
        global_attn_indexes: SAM's global-attention blocks (their rel-pos tables are 2*64-1 long).
        neck_dim: channels of the four neck outputs (256).
        decoder_dim: channels of the multi-layer-aggregation heads (128).
        apg_base: base channels of the auto prompt generator U-Net (16).
        apg_levels: maximum number of downsamplings of that U-Net (4); fewer when the grid is small.
        prompt_depth: two-way transformer depth of the point-prompt encoder (2).
        prompt_heads: its attention heads (8).
        prompt_mlp_dim: its MLP width (2048).
        num_global_queries: learnable global queries of the point-prompt encoder (10).
        roi_size: training crop ``[X, Y, Z]``; sizes the depth embedding (``Z / voxels_per_token``).
    """

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    sam_img_size: int = 1024
    patch_size: int = 16
    upsample: int = 4
    window_size: int = 8
    sam_window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    neck_dim: int = 256
    decoder_dim: int = 128
    apg_base: int = 16
    apg_levels: int = 4
    prompt_depth: int = 2
    prompt_heads: int = 8
    prompt_mlp_dim: int = 2048
    num_global_queries: int = 10
    roi_size: tuple[int, int, int] = (128, 128, 128)

    def __post_init__(self) -> None:
        if self.depth < 4:
            raise ValueError(f"teacher arch: depth {self.depth} < 4; four necks tap the encoder")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"teacher arch: embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.patch_size % self.upsample:
            raise ValueError(f"teacher arch: patch_size {self.patch_size} is not divisible by upsample {self.upsample}")
        if len(self.roi_size) != 3 or any(int(s) % self.voxels_per_token for s in self.roi_size):
            raise ValueError(
                f"teacher arch: roi_size {list(self.roi_size)} must be 3 sizes, each a multiple of "
                f"{self.voxels_per_token} (voxels per token)"
            )
        if self.neck_dim % self.prompt_heads or (self.neck_dim // 2) % self.prompt_heads:
            raise ValueError(f"teacher arch: neck_dim {self.neck_dim} must be divisible by 2 * prompt_heads {self.prompt_heads}")

    @property
    def voxels_per_token(self) -> int:
        """Voxels per token along each axis (16 / 4 = 4 for the paper configuration)."""
        return self.patch_size // self.upsample

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def neck_indexes(self) -> tuple[int, ...]:
        """Blocks (0-based) after which a neck taps the encoder: evenly spaced quarters (2, 5, 8, 11 for 12)."""
        return tuple(self.depth * (i + 1) // 4 - 1 for i in range(4))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TeacherArch":
        """Inverse of :meth:`to_dict` (lists back to tuples)."""
        values = dict(values)
        for key in ("global_attn_indexes", "roi_size"):
            if key in values:
                values[key] = tuple(int(v) for v in values[key])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["global_attn_indexes"] = list(self.global_attn_indexes)
        d["roi_size"] = list(self.roi_size)
        return d
