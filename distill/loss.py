"""The knowledge-distillation loss: imitate the teacher, fit the labels, in a tunable mix.

    L = λ · MSE(student, teacher) + (1 − λ) · DiceCE(student, label)

λ = 0 is plain supervised training, λ = 1 pure imitation of the teacher. The MSE compares raw logits by
default (``kd_target="logits"``) or softmax probabilities at temperature T (``kd_target="probs"``,
``softmax(z / T)`` for both models). In the probability form the squared differences shrink like 1/T² as T
grows, and so do their gradients; as Hinton et al. do for their soft-target term, the KD term is multiplied
by T² (``scale_by_t2=True``, the default) so that changing T does not silently rescale λ. At T = 1 the
factor is 1. The logit form uses no temperature (dividing both logits by T would only scale MSE by 1/T²,
which T² undoes).

``kd_target="sqrt_probs"`` compares the square roots of those probabilities (per voxel the squared Hellinger distance,
×2): the same [0, 1] range, so λ keeps its meaning, but where the student misses a class the teacher sees (student
probability p -> 0, teacher q), the gradient on that class's logit fades like √p·√q instead of p·q: at p = 0.001, q = 0.5
it is ~20× that of the probability form. The MSE on probabilities saturates there, which left the demo's KD students
without the pancreas until late in the run (validation Dice 0.00 / 0.01 / 0.31 / 0.45 at steps 100 / 200 / 300 / 400).

Voxels where the teacher has nothing to say are left out of the KD term: ``kd_mask`` (``B x 1 x X x Y x Z``,
1 inside the volume, 0 on the padding of a crop larger than its volume; ``data.transforms`` explains why a
mask and not an invented target) makes the MSE a mean over the masked voxels (and the K channels), which
is the plain mean when the mask is all ones.

Cases without a label (unlabelled volumes, through the teacher's cache): ``has_label`` (B,) marks the
labelled ones. With ``pseudo_labels=False`` an unlabelled case contributes the KD term only (the supervised
term is the DiceCE over the labelled cases, 0 when the batch has none). With ``pseudo_labels=True`` the
DiceCE term also takes the unlabelled cases, with the teacher's argmax as their label (``distill.cache``
writes it under ``label``), as the semi-supervised entries of large CT challenges train on unlabelled scans.
Why both options exist (measured with ``python -m distill.kd_regimes``, SwinUNETR-tiny, 4³ windows, 8 labelled +
32 unlabelled site phantoms, 400 steps, λ = 0.5, MSE on softmax(z/2); test Dice on the demo's 10 test phantoms;
docs/measurements.md): in the demo's class-balanced 64 × 64 × 32 crops 89 % of the voxels are background, 7 % liver
and 0.3–1.2 % each other organ, so a uniform MSE is almost all background and liver, and the student learnt the
liver only (test Dice 0.118; λ = 0 on the 8 labelled cases: 0.590). A class-balanced MSE alone gave 0.611,
pseudo-labels alone 0.607, both 0.609; at 1000 steps both (0.755) beat either alone (0.685 / 0.700).

``kd_weighting`` decides what the MSE averages over: ``uniform`` (every voxel alike) or ``class_balanced``
(each voxel weighted by the inverse frequency, in the batch, of its class in the label, the teacher's argmax
for unlabelled cases, so that every class present carries the same total weight, as a class-balanced CE
would). The weights are normalised to mean 1 over the counted voxels, so λ keeps its meaning.
"""
from __future__ import annotations

import torch
from monai.losses import DiceCELoss
from torch import nn
from torch.nn import functional as F

KD_TARGETS = ("logits", "probs", "sqrt_probs")
KD_WEIGHTINGS = ("uniform", "class_balanced")
LAMBDA_SCHEDULES = ("constant", "linear")
_SQRT_EPS = 1e-6  # keeps the derivative of √p finite at p = 0


def lambda_at(lambda_kd: float, step: int, steps: int, schedule: str = "constant", end_ratio: float = 0.0) -> float:
    """λ for the optimizer step with index ``step`` (0-based) of a ``steps``-step run.

    ``constant`` keeps λ; ``linear`` decays it from λ to ``end_ratio · λ`` as
    ``λ · (end_ratio + (1 − end_ratio) · (1 − step / steps))``: the student imitates the teacher first, which
    finds every organ in fewer steps than labels do, and fits the labels at the end, where a teacher no better
    than the labels would hold it back (docs/measurements.md, "Does distillation pay"). ``end_ratio`` > 0 keeps
    part of the teacher to the end (and so the unlabelled crops, whose only term is the teacher's).
    λ = 0 stays 0, so a λ = 0 student never sees the teacher under any schedule.
    """
    if schedule not in LAMBDA_SCHEDULES:
        raise KDLossError(f"distill.lambda_schedule must be one of {LAMBDA_SCHEDULES}, got {schedule!r}")
    if steps < 1 or not 0 <= step:
        raise KDLossError(f"lambda_at needs steps >= 1 and step >= 0, got step {step} of {steps}")
    if not 0.0 <= float(end_ratio) <= 1.0:
        raise KDLossError(f"distill.lambda_end_ratio must lie in [0, 1], got {end_ratio!r}")
    if schedule == "constant":
        return float(lambda_kd)
    left = max(0.0, 1.0 - step / steps)
    return float(lambda_kd) * (float(end_ratio) + (1.0 - float(end_ratio)) * left)


class KDLossError(ValueError):
    """A KD loss setting or input that cannot be used; the message names the argument and value."""


class KDLoss(nn.Module):
    """``λ · MSE(student, teacher) + (1 − λ) · DiceCE(student, label)`` with unlabelled cases allowed.

    Args:
        lambda_kd: weight λ of the imitation term, in [0, 1].
        kd_target: ``"logits"`` (MSE on raw logits), ``"probs"`` (MSE on ``softmax(z / T)``) or ``"sqrt_probs"``
            (MSE on their square roots).
        temperature: T > 0, used by the probability forms only.
        num_classes: K (background included); when given, inputs with another channel count are refused.
        scale_by_t2: multiply the probability-form KD term by T² (see the module docstring).
        pseudo_labels: unlabelled cases join the DiceCE term with the label they carry (the teacher's argmax).
        kd_weighting: ``"uniform"`` or ``"class_balanced"`` voxel weights in the MSE (module docstring).
    """

    def __init__(
        self,
        lambda_kd: float,
        kd_target: str = "logits",
        temperature: float = 1.0,
        num_classes: int | None = None,
        scale_by_t2: bool = True,
        pseudo_labels: bool = False,
        kd_weighting: str = "uniform",
    ) -> None:
        super().__init__()
        lambda_kd = float(lambda_kd)
        if not 0.0 <= lambda_kd <= 1.0:
            raise KDLossError(f"lambda_kd must lie in [0, 1], got {lambda_kd}")
        if kd_target not in KD_TARGETS:
            raise KDLossError(f"kd_target must be one of {KD_TARGETS}, got {kd_target!r}")
        if not float(temperature) > 0.0:
            raise KDLossError(f"temperature must be > 0, got {temperature}")
        if kd_weighting not in KD_WEIGHTINGS:
            raise KDLossError(f"kd_weighting must be one of {KD_WEIGHTINGS}, got {kd_weighting!r}")
        if num_classes is not None and int(num_classes) < 2:
            raise KDLossError(f"num_classes must be >= 2 (background included), got {num_classes}")
        self.lambda_kd = lambda_kd
        self.kd_target = kd_target
        self.temperature = float(temperature)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.scale_by_t2 = scale_by_t2
        self.pseudo_labels = bool(pseudo_labels)
        self.kd_weighting = kd_weighting
        self.dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)

    def kd_term(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                kd_mask: torch.Tensor | None = None, label: torch.Tensor | None = None) -> torch.Tensor:
        """Mean squared difference between student and teacher, both ``B x K x X x Y x Z``.

        Args:
            student_logits: ``B x K x X x Y x Z``.
            teacher_logits: same shape.
            kd_mask: ``B x 1 x X x Y x Z`` (or ``B x X x Y x Z``) weights, 1 where the teacher's target counts;
                None counts every voxel.
            label: ``B x 1 x X x Y x Z`` class map the ``class_balanced`` weights are counted on (the label, or
                the teacher's argmax for unlabelled cases); None: the teacher's argmax everywhere.
        """
        teacher_logits = teacher_logits.detach().to(student_logits.dtype)
        if self.kd_target == "logits":
            a, b, scale = student_logits, teacher_logits, 1.0
        else:
            t = self.temperature
            a, b = torch.softmax(student_logits / t, dim=1), torch.softmax(teacher_logits / t, dim=1)
            if self.kd_target == "sqrt_probs":
                # √p: the gradient of a class the student misses (p -> 0) fades like √p, not like p (module docstring).
                a, b = (a + _SQRT_EPS).sqrt(), (b + _SQRT_EPS).sqrt()
            scale = t * t if self.scale_by_t2 else 1.0
        if kd_mask is None and self.kd_weighting == "uniform":
            return F.mse_loss(a, b) * scale
        mask = a.new_ones((a.shape[0], 1, *a.shape[2:])) if kd_mask is None else kd_mask.to(a.dtype)
        if mask.ndim == a.ndim - 1:
            mask = mask[:, None]
        if mask.shape[0] != a.shape[0] or mask.shape[1] != 1 or mask.shape[2:] != a.shape[2:]:
            raise KDLossError(f"kd_mask must be B x 1 x X x Y x Z matching the logits {tuple(a.shape)}, "
                              f"got {tuple(kd_mask.shape)}")
        if self.kd_weighting == "class_balanced":
            mask = mask * self._class_weights(teacher_logits if label is None else label, mask)
        squared = ((a - b) ** 2 * mask).sum()
        count = mask.sum() * a.shape[1]
        # A batch made of padding only has no KD voxel: contribute 0, not 0/0.
        return squared / count.clamp_min(1.0) * scale

    @staticmethod
    def _class_weights(classes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``B x 1 x X x Y x Z`` weights: 1 / (voxels of the voxel's class among the counted ones), scaled to
        mean 1 over the counted voxels; ``classes`` is a class map or logits (their argmax is taken)."""
        cls = classes.argmax(dim=1, keepdim=True) if classes.shape[1] > 1 else classes.long()
        counted = mask > 0
        k = int(cls.max()) + 1
        counts = torch.bincount(cls[counted].reshape(-1), minlength=k).to(mask.dtype)
        per_class = torch.where(counts > 0, 1.0 / counts.clamp_min(1.0), torch.zeros_like(counts))
        weights = per_class[cls] * counted.to(mask.dtype)
        total = weights.sum()
        return weights * (counted.sum().to(mask.dtype) / total) if total > 0 else weights

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
            kd = self.kd_term(student_logits, teacher_logits, kd_mask, label)

        sup = zero
        # With pseudo-labels every case is supervised: unlabelled ones by the teacher's argmax (in ``label``).
        supervised = torch.ones_like(has_label) if (self.pseudo_labels and label is not None) else has_label
        if self.lambda_kd < 1.0 and bool(supervised.any()):
            if label is None:
                raise KDLossError("has_label marks labelled cases but label is None")
            if label.ndim != 5 or label.shape[0] != batch or label.shape[1] != 1 or label.shape[2:] != student_logits.shape[2:]:
                raise KDLossError(
                    f"label must be B x 1 x X x Y x Z matching the logits {tuple(student_logits.shape)}, "
                    f"got {tuple(label.shape)}"
                )
            sup = self.dice_ce(student_logits[supervised], label[supervised])

        loss = self.lambda_kd * kd + (1.0 - self.lambda_kd) * sup
        if not loss.requires_grad and student_logits.requires_grad:
            # A batch with nothing to learn (e.g. λ = 0 and no labelled case) still backpropagates zeros.
            loss = loss + 0.0 * student_logits.sum()
        # Tensors, not floats: a float() here would wait for a GPU every step; fit averages them on the device.
        return loss, {"kd": kd.detach(), "sup": sup.detach()}
