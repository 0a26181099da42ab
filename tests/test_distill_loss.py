"""KDLoss against values computed by hand with numpy on tiny tensors."""
import numpy as np
import pytest
import torch

from distill.loss import KDLoss, KDLossError, lambda_at

SMOOTH = 1e-5  # MONAI DiceLoss smooth_nr = smooth_dr default


def np_softmax(z, axis=1):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_dice_ce(logits, label):
    """DiceCE as MONAI defines it: mean soft Dice loss over (case, class) + mean cross-entropy over voxels."""
    k = logits.shape[1]
    p = np_softmax(logits)
    onehot = np.stack([(label[:, 0] == c) for c in range(k)], axis=1).astype(np.float64)
    axes = tuple(range(2, logits.ndim))
    inter = (p * onehot).sum(axis=axes)
    denom = p.sum(axis=axes) + onehot.sum(axis=axes)
    dice = (1.0 - (2.0 * inter + SMOOTH) / (denom + SMOOTH)).mean()
    ce = -(np.log(p) * onehot).sum(axis=1).mean()
    return dice + ce


def tiny_batch(seed=0, batch=2, k=3, size=(2, 3, 2)):
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(batch, k, *size))
    teacher = rng.normal(size=(batch, k, *size)) * 2.0
    label = rng.integers(0, k, size=(batch, 1, *size))
    return student, teacher, label


def as_t(a, dtype=torch.float64):
    return torch.tensor(a, dtype=dtype)


def test_logit_mse_and_dice_ce_mix_matches_hand_computation():
    s, t, y = tiny_batch()
    loss, parts = KDLoss(lambda_kd=0.3, num_classes=3)(as_t(s), as_t(t), as_t(y, torch.long))
    kd = ((s - t) ** 2).mean()
    sup = np_dice_ce(s, y)
    assert parts["kd"] == pytest.approx(kd, rel=1e-6)
    assert parts["sup"] == pytest.approx(sup, rel=1e-6)
    assert float(loss) == pytest.approx(0.3 * kd + 0.7 * sup, rel=1e-6)


def test_probability_target_uses_temperature_and_t_squared():
    s, t, y = tiny_batch(seed=1)
    T = 3.0
    mse = ((np_softmax(s / T) - np_softmax(t / T)) ** 2).mean()
    loss, parts = KDLoss(lambda_kd=1.0, kd_target="probs", temperature=T)(as_t(s), as_t(t), None)
    assert parts["kd"] == pytest.approx(T * T * mse, rel=1e-6)
    assert float(loss) == pytest.approx(T * T * mse, rel=1e-6)
    _, unscaled = KDLoss(lambda_kd=1.0, kd_target="probs", temperature=T, scale_by_t2=False)(as_t(s), as_t(t), None)
    assert unscaled["kd"] == pytest.approx(mse, rel=1e-6)


def test_square_root_target_matches_hand_computation_and_keeps_the_gradient_of_a_missed_class():
    s, t, y = tiny_batch(seed=2)
    T = 2.0
    mse = ((np.sqrt(np_softmax(s / T) + 1e-6) - np.sqrt(np_softmax(t / T) + 1e-6)) ** 2).mean()
    _, parts = KDLoss(lambda_kd=1.0, kd_target="sqrt_probs", temperature=T)(as_t(s), as_t(t), None)
    assert parts["kd"] == pytest.approx(T * T * mse, rel=1e-6)
    # One voxel, two classes: the teacher says class 1 at q = 0.5 (T = 2), the student misses it (p ~ 0.001).
    teacher = torch.tensor([0.0, 0.0], dtype=torch.float64).reshape(1, 2, 1, 1, 1)
    grads = {}
    for target in ("probs", "sqrt_probs"):
        student = torch.tensor([0.0, -2.0 * 6.9], dtype=torch.float64).reshape(1, 2, 1, 1, 1).requires_grad_(True)
        loss, _ = KDLoss(lambda_kd=1.0, kd_target=target, temperature=T)(student, teacher, None)
        loss.backward()
        grads[target] = float(student.grad[0, 1].abs())
    assert grads["sqrt_probs"] > 10 * grads["probs"], grads


def test_lambda_zero_is_plain_supervised_and_one_is_pure_imitation():
    s, t, y = tiny_batch(seed=2)
    sup_only, _ = KDLoss(lambda_kd=0.0)(as_t(s), None, as_t(y, torch.long))
    assert float(sup_only) == pytest.approx(np_dice_ce(s, y), rel=1e-6)
    kd_only, parts = KDLoss(lambda_kd=1.0)(as_t(s), as_t(t), None)
    assert float(kd_only) == pytest.approx(((s - t) ** 2).mean(), rel=1e-6)
    assert parts["sup"] == 0.0


def test_unlabelled_cases_contribute_only_the_kd_term():
    s, t, y = tiny_batch(seed=3, batch=3)
    has_label = torch.tensor([True, False, True])
    y_garbage = y.copy()
    y_garbage[1] = 0  # whatever sits in an unlabelled slot must not matter
    loss, parts = KDLoss(lambda_kd=0.4)(as_t(s), as_t(t), as_t(y_garbage, torch.long), has_label)
    kd = ((s - t) ** 2).mean()
    sup = np_dice_ce(s[[0, 2]], y[[0, 2]])
    assert float(loss) == pytest.approx(0.4 * kd + 0.6 * sup, rel=1e-6)

    student = as_t(s).requires_grad_(True)
    loss, _ = KDLoss(lambda_kd=0.4)(student, as_t(t), as_t(y_garbage, torch.long), has_label)
    loss.backward()
    # The unlabelled case's gradient is exactly that of 0.4 * MSE: 0.4 * 2 (s - t) / N.
    expected = 0.4 * 2.0 * (s[1] - t[1]) / s.size
    np.testing.assert_allclose(student.grad[1].numpy(), expected, rtol=1e-6, atol=1e-12)


def test_batch_without_labels_gives_kd_only_and_still_backpropagates():
    s, t, _ = tiny_batch(seed=4)
    student = as_t(s).requires_grad_(True)
    loss, parts = KDLoss(lambda_kd=0.5)(student, as_t(t), None, torch.tensor([False, False]))
    assert float(loss.detach()) == pytest.approx(0.5 * ((s - t) ** 2).mean(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(student.grad).all()


def test_teacher_receives_no_gradient():
    s, t, y = tiny_batch(seed=5)
    teacher = as_t(t).requires_grad_(True)
    loss, _ = KDLoss(lambda_kd=0.5)(as_t(s).requires_grad_(True), teacher, as_t(y, torch.long))
    loss.backward()
    assert teacher.grad is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lambda_kd": 1.5}, "lambda_kd must lie in \\[0, 1\\], got 1.5"),
        ({"lambda_kd": -0.1}, "got -0.1"),
        ({"lambda_kd": 0.5, "kd_target": "kl"}, "kd_target"),
        ({"lambda_kd": 0.5, "temperature": 0.0}, "temperature"),
    ],
)
def test_bad_settings_are_refused_naming_the_value(kwargs, match):
    with pytest.raises(KDLossError, match=match):
        KDLoss(**kwargs)
    assert issubclass(KDLossError, ValueError)


def test_bad_inputs_are_refused():
    s, t, y = tiny_batch()
    with pytest.raises(KDLossError, match="num_classes=4"):
        KDLoss(0.5, num_classes=4)(as_t(s), as_t(t), as_t(y, torch.long))
    with pytest.raises(KDLossError, match="needs teacher_logits"):
        KDLoss(0.5)(as_t(s), None, as_t(y, torch.long))
    with pytest.raises(KDLossError, match="teacher_logits shape"):
        KDLoss(0.5)(as_t(s), as_t(t[:, :2]), as_t(y, torch.long))


def test_pseudo_labels_put_unlabelled_cases_into_the_dice_ce_term():
    """pseudo_labels=True: DiceCE over every case with the label it carries (the teacher's argmax for an
    unlabelled one); False: over the labelled cases only. The KD term is the same either way."""
    s, t, y = tiny_batch(seed=3, batch=3)
    has = torch.tensor([True, False, False])
    with_pseudo, parts = KDLoss(0.25, pseudo_labels=True)(as_t(s), as_t(t), as_t(y, torch.long), has)
    without, parts_without = KDLoss(0.25)(as_t(s), as_t(t), as_t(y, torch.long), has)
    kd = ((s - t) ** 2).mean()
    assert parts["kd"] == pytest.approx(kd) and parts_without["kd"] == pytest.approx(kd)
    assert parts["sup"] == pytest.approx(np_dice_ce(s, y), rel=1e-6)
    assert parts_without["sup"] == pytest.approx(np_dice_ce(s[:1], y[:1]), rel=1e-6)
    assert float(with_pseudo) == pytest.approx(0.25 * kd + 0.75 * np_dice_ce(s, y), rel=1e-6)
    # A batch of unlabelled cases alone is supervised too, not left to the MSE.
    _, only = KDLoss(0.5, pseudo_labels=True)(as_t(s), as_t(t), as_t(y, torch.long), torch.zeros(3, dtype=torch.bool))
    assert only["sup"] == pytest.approx(np_dice_ce(s, y), rel=1e-6)


def test_class_balanced_mse_gives_each_class_the_same_total_weight():
    """90 % background, 10 % organ; the student is off by e on the organ voxels only. A uniform MSE sees 0.1 of
    the error, a class-balanced one 0.5 (each class half the weight), with weights of mean 1 over the voxels."""
    k, size = 2, (10, 4, 2)
    label = np.zeros((1, 1, *size), dtype=np.int64)
    label[:, :, 0] = 1                                   # 8 of 80 voxels are the organ
    teacher = np.concatenate([np.where(label == 1, 0.0, 4.0), np.where(label == 1, 4.0, 0.0)], axis=1)
    student = teacher + np.where(label == 1, 1.5, 0.0)  # error 1.5 on both channels of organ voxels
    e2 = 1.5 ** 2
    uniform = KDLoss(1.0).kd_term(as_t(student), as_t(teacher))
    balanced = KDLoss(1.0, kd_weighting="class_balanced").kd_term(as_t(student), as_t(teacher), label=as_t(label, torch.long))
    assert float(uniform) == pytest.approx(e2 * 0.1)
    assert float(balanced) == pytest.approx(e2 * 0.5)
    # Without a label the classes are the teacher's argmax (here the same map).
    assert float(KDLoss(1.0, kd_weighting="class_balanced").kd_term(as_t(student), as_t(teacher))) == pytest.approx(e2 * 0.5)
    # Padding (kd_mask 0) is neither counted nor weighted: mask out half the background, the organ's share holds.
    mask = np.ones((1, 1, *size))
    mask[:, :, 5:] = 0
    masked = KDLoss(1.0, kd_weighting="class_balanced").kd_term(as_t(student), as_t(teacher), as_t(mask), as_t(label, torch.long))
    assert float(masked) == pytest.approx(e2 * 0.5)
    with pytest.raises(KDLossError, match="kd_weighting"):
        KDLoss(0.5, kd_weighting="focal")


def test_lambda_schedule_constant_keeps_lambda_linear_decays_it_to_the_labels():
    assert [lambda_at(0.5, s, 400) for s in (0, 200, 399)] == [0.5, 0.5, 0.5]
    assert [lambda_at(0.8, s, 400, "linear") for s in (0, 100, 200, 300)] == pytest.approx([0.8, 0.6, 0.4, 0.2])
    assert lambda_at(0.8, 399, 400, "linear") == pytest.approx(0.002)
    assert lambda_at(0.0, 10, 400, "linear") == 0.0  # λ = 0 never sees the teacher
    with pytest.raises(KDLossError, match="lambda_schedule.*cosine"):
        lambda_at(0.5, 0, 400, "cosine")


def test_linear_lambda_falls_to_its_end_ratio_and_never_below():
    assert [lambda_at(1.0, s, 400, "linear", 0.25) for s in (0, 200, 400)] == pytest.approx([1.0, 0.625, 0.25])
    assert lambda_at(0.4, 400, 400, "linear", 0.5) == pytest.approx(0.2)
    assert lambda_at(0.0, 100, 400, "linear", 0.5) == 0.0
    assert lambda_at(0.6, 100, 400, "constant", 0.5) == 0.6  # the ratio belongs to the linear schedule
    with pytest.raises(KDLossError, match="lambda_end_ratio.*1.5"):
        lambda_at(1.0, 0, 400, "linear", 1.5)
