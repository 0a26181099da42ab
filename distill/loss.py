"""The knowledge-distillation loss: imitate the teacher, fit the labels, in a tunable mix.

    L = λ · MSE(student, teacher) + (1 − λ) · DiceCE(student, label)

λ = 0 is plain supervised training, λ = 1 pure imitation of the teacher. The MSE compares raw logits by
default (``kd_target="logits"``) or softmax probabilities at temperature T (``kd_target="probs"``,
``softmax(z / T)`` for both models). In the probability form the squared differences shrink like 1/T² as T
grows, and so do their gradients; as Hinton et al. do for their soft-target term, the KD term is multiplied
by T² (``scale_by_t2=True``, the default) so that changing T does not silently rescale λ. At T = 1 the
factor is 1. The logit form uses no temperature (dividing both logits by T would only scale MSE by 1/T²,
which T² undoes).

Voxels where the teacher has nothing to say are left out of the KD term: ``kd_mask`` (``B x 1 x X x Y x Z``,
1 inside the volume, 0 on the padding of a crop larger than its volume; ``data.transforms`` explains why a
mask and not an invented target) makes the MSE a mean over the masked voxels (and the K channels), which
is the plain mean when the mask is all ones.

Cases without a label (unlabelled volumes labelled by the teacher through the cache) contribute only the
KD term: ``has_label`` (B,) marks the labelled ones. The KD term is the mean over the whole batch, the
supervised term the DiceCE over the labelled cases only (0 when the batch has none), so an unlabelled case
is trained with ``λ · KD`` alone.
"""
from __future__ import annotations

import torch
from monai.losses import DiceCELoss
from torch import nn
from torch.nn import functional as F

KD_TARGETS = ("logits", "probs")


class KDLossError(ValueError):
    """A KD loss setting or input that cannot be used; the message names the argument and value."""


class KDLoss(nn.Module):
    """``λ · MSE(student, teacher) + (1 − λ) · DiceCE(student, label)`` with unlabelled cases allowed.

    Args:
        lambda_kd: weight λ of the imitation term, in [0, 1].
        kd_target: ``"logits"`` (MSE on raw logits) or ``"probs"`` (MSE on ``softmax(z / T)``).
        temperature: T > 0, used by ``kd_target="probs"`` only.
        num_classes: K (background included); when given, inputs with another channel count are refused.
        scale_by_t2: multiply the probability-form KD term by T² (see the module docstring).
    """

    def __init__(
        self,
        lambda_kd: float,
        kd_target: str = "logits",
        temperature: float = 1.0,
        num_classes: int | None = None,
        scale_by_t2: bool = True,
    ) -> None:
        super().__init__()
        lambda_kd = float(lambda_kd)
        if not 0.0 <= lambda_kd <= 1.0:
            raise KDLossError(f"lambda_kd must lie in [0, 1], got {lambda_kd}")
        if kd_target not in KD_TARGETS:
            raise KDLossError(f"kd_target must be one of {KD_TARGETS}, got {kd_target!r}")
        if not float(temperature) > 0.0:
            raise KDLossError(f"temperature must be > 0, got {temperature}")
        if num_classes is not None and int(num_classes) < 2:
            raise KDLossError(f"num_classes must be >= 2 (background included), got {num_classes}")
        self.lambda_kd = lambda_kd
        self.kd_target = kd_target
        self.temperature = float(temperature)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.scale_by_t2 = scale_by_t2
        self.dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)

    def kd_term(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                kd_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean squared difference between student and teacher, both ``B x K x X x Y x Z``.

        Args:
            student_logits: ``B x K x X x Y x Z``.
            teacher_logits: same shape.
            kd_mask: ``B x 1 x X x Y x Z`` (or ``B x X x Y x Z``) weights, 1 where the teacher's target counts;
                None counts every voxel.
        """
        teacher_logits = teacher_logits.detach().to(student_logits.dtype)
        if self.kd_target == "logits":
            a, b, scale = student_logits, teacher_logits, 1.0
        else:
            t = self.temperature
            a, b = torch.softmax(student_logits / t, dim=1), torch.softmax(teacher_logits / t, dim=1)
            scale = t * t if self.scale_by_t2 else 1.0
        if kd_mask is None:
            return F.mse_loss(a, b) * scale
        mask = kd_mask.to(a.dtype)
        if mask.ndim == a.ndim - 1:
            mask = mask[:, None]
        if mask.shape[0] != a.shape[0] or mask.shape[1] != 1 or mask.shape[2:] != a.shape[2:]:
            raise KDLossError(f"kd_mask must be B x 1 x X x Y x Z matching the logits {tuple(a.shape)}, "
                              f"got {tuple(kd_mask.shape)}")
        squared = ((a - b) ** 2 * mask).sum()
        count = mask.sum() * a.shape[1]
        # A batch made of padding only has no KD voxel: contribute 0, not 0/0.
        return squared / count.clamp_min(1.0) * scale

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        label: torch.Tensor | None,
        has_label: torch.Tensor | None = None,
        kd_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Compute the loss for one batch.

        Args:
            student_logits: ``B x K x X x Y x Z``.
            teacher_logits: ``B x K x X x Y x Z`` soft targets, or None when λ = 0.
            label: ``B x 1 x X x Y x Z`` integer class map (entries of unlabelled cases are ignored),
                or None when no case is labelled.
            has_label: ``(B,)`` bool, which cases carry a real label; None means all of them when
                ``label`` is given.
            kd_mask: ``B x 1 x X x Y x Z``, 1 where the teacher target counts (inside the volume), 0 on
                padding; None counts every voxel.

        Returns:
            ``(loss, {"kd": float, "sup": float})``; the parts are the unweighted terms (0.0 when absent).
        """
        if student_logits.ndim != 5:
            raise KDLossError(f"student_logits must be B x K x X x Y x Z, got shape {tuple(student_logits.shape)}")
        batch, channels = student_logits.shape[:2]
        if self.num_classes is not None and channels != self.num_classes:
            raise KDLossError(f"student_logits has {channels} channels, expected num_classes={self.num_classes}")
        if has_label is None:
            has_label = torch.full((batch,), label is not None, dtype=torch.bool, device=student_logits.device)
        has_label = torch.as_tensor(has_label, device=student_logits.device).reshape(-1).bool()
        if has_label.numel() != batch:
            raise KDLossError(f"has_label has {has_label.numel()} entries for a batch of {batch}")

        zero = student_logits.new_zeros(())
        kd = zero
        if self.lambda_kd > 0.0:
            if teacher_logits is None:
                raise KDLossError(f"lambda_kd={self.lambda_kd} needs teacher_logits, got None")
            if teacher_logits.shape != student_logits.shape:
                raise KDLossError(
                    f"teacher_logits shape {tuple(teacher_logits.shape)} != student_logits shape "
                    f"{tuple(student_logits.shape)}"
                )
            kd = self.kd_term(student_logits, teacher_logits, kd_mask)

        sup = zero
        if self.lambda_kd < 1.0 and bool(has_label.any()):
            if label is None:
                raise KDLossError("has_label marks labelled cases but label is None")
            if label.ndim != 5 or label.shape[0] != batch or label.shape[1] != 1 or label.shape[2:] != student_logits.shape[2:]:
                raise KDLossError(
                    f"label must be B x 1 x X x Y x Z matching the logits {tuple(student_logits.shape)}, "
                    f"got {tuple(label.shape)}"
                )
            sup = self.dice_ce(student_logits[has_label], label[has_label])

        loss = self.lambda_kd * kd + (1.0 - self.lambda_kd) * sup
        if not loss.requires_grad and student_logits.requires_grad:
            # A batch with nothing to learn (e.g. λ = 0 and no labelled case) still backpropagates zeros.
            loss = loss + 0.0 * student_logits.sum()
        return loss, {"kd": float(kd.detach()), "sup": float(sup.detach())}
