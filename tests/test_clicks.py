"""Simulated clicks land where a user would click, and the protocol reports Dice/NSD per click count."""
import numpy as np
import pytest

from evaluation.clicks import ClickError, click_protocol, dice_auc, next_click

SPACING = (1.0, 1.0, 1.0)
SHAPE = (40, 40, 24)


def ball(center, radius, shape=SHAPE, spacing=SPACING):
    axes = [np.arange(n) * s for n, s in zip(shape, spacing)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    return np.linalg.norm(grid - np.asarray(center, float) * spacing, axis=-1) <= radius


def test_first_click_is_the_deepest_voxel_of_the_target():
    gt = np.zeros(SHAPE, bool)
    gt[10:21, 5:30, 4:15] = True  # an 11 x 25 x 11 box: its centre is the farthest voxel from the boundary
    gt[30:33, 30:33, 2:4] = True  # a small separate blob is never the first click
    click = next_click(np.zeros(SHAPE, bool), gt, SPACING)
    assert click is not None
    coord, positive = click
    assert positive
    assert coord[0] == 15 and coord[2] == 9 and 10 <= coord[1] <= 24  # deep along the long axis anywhere


def test_first_click_respects_anisotropic_spacing():
    # 20 x 20 x 6 voxels. In voxels the slab is thinnest along z, so every voxel of the two middle
    # z-slices is "deepest" and the first one in scan order wins, near a corner. At 4 mm per slice the
    # slab is 24 mm thick: depth is limited by x and y and the click moves to the slab's centre.
    gt = np.zeros((24, 24, 10), bool)
    gt[2:22, 2:22, 2:8] = True
    (x, y, z), _ = next_click(np.zeros_like(gt), gt, (1.0, 1.0, 1.0))
    assert (x, y, z) == (4, 4, 4)  # 3 voxels from the boundary along x, y and z
    (x, y, z), _ = next_click(np.zeros_like(gt), gt, (1.0, 1.0, 4.0))
    assert x in (11, 12) and y in (11, 12) and z in (4, 5)


def test_next_click_goes_to_the_largest_error_with_the_right_sign():
    gt = ball((20, 20, 12), 8)
    # Over-segmentation: a large false-positive blob outside the target, plus a small miss inside it.
    pred = gt.copy()
    pred[2:10, 2:10, 2:10] = True  # 512 false-positive voxels
    pred[20:23, 20:23, 12:15] = False  # 27 false-negative voxels
    (x, y, z), positive = next_click(pred, gt, SPACING)
    assert not positive
    assert (x, y, z) in {(i, j, k) for i in (5, 6) for j in (5, 6) for k in (5, 6)}  # the blob's centre

    # Under-segmentation: the prediction misses the lower half of the ball.
    under = gt.copy()
    under[:20] = False
    (x, y, z), positive = next_click(under, gt, SPACING)
    assert positive and gt[x, y, z] and not under[x, y, z]

    assert next_click(gt.copy(), gt, SPACING) is None  # perfect: no click


def test_next_click_rejects_bad_masks():
    with pytest.raises(ClickError, match="empty"):
        next_click(np.zeros(SHAPE, bool), np.zeros(SHAPE, bool), SPACING)
    with pytest.raises(ClickError, match="shape"):
        next_click(np.zeros((4, 4, 4), bool), np.ones((4, 4, 5), bool), SPACING)
    with pytest.raises(ClickError, match="binary"):
        next_click(np.full(SHAPE, 2), np.ones(SHAPE, bool), SPACING)


def test_protocol_improves_dice_as_clicks_accumulate():
    # A sphere target and a "model" that segments a radius-4 sphere around every positive click, inside
    # the organ. Dice rises strictly only if every click lands on a part of the target not yet covered.
    gt = ball((20, 20, 12), 9)
    calls = []

    def segment_fn(image, coords, labels):
        assert image == "ct-volume"
        assert coords.shape == (len(labels), 3) and coords.dtype.kind == "i"
        calls.append(len(labels))
        mask = np.zeros(SHAPE, bool)
        for (x, y, z), label in zip(coords, labels):
            if label == 1:
                mask |= ball((x, y, z), 4)
        return mask & gt

    result = click_protocol(segment_fn, "ct-volume", gt, SPACING, n_clicks=(1, 3, 5, 10), nsd_tolerance_mm=2.0)
    curve = result["dice_curve"]
    assert len(curve) == 10 and len(result["clicks"]) == 10
    assert all(later > earlier for earlier, later in zip(curve, curve[1:]))
    assert all(positive for _, positive in result["clicks"])  # never over-segments: no negative click
    assert result["clicks"][0] == ((20, 20, 12), True)  # the sphere's centre
    assert list(result["dice"]) == [1, 3, 5, 10] and list(result["nsd"]) == [1, 3, 5, 10]
    assert result["dice"] == {n: curve[n - 1] for n in (1, 3, 5, 10)}  # the value at each count
    assert calls == list(range(1, 11))  # clicks accumulate
    assert result["dice_auc"] == pytest.approx(dice_auc(curve))
    # The first ball lies 5 mm inside the target's surface everywhere: no boundary within 2 mm yet.
    assert result["nsd"][1] == 0.0 < result["nsd"][3] < result["nsd"][10] <= 1.0


def test_protocol_reports_each_count_not_the_best_over_clicks():
    # A model that gets worse after its second click: the report must show the drop.
    gt = ball((20, 20, 12), 6)

    def good_then_wrong(image, coords, labels):
        return ball((20, 20, 12), 5) if len(labels) == 1 else ball((5, 5, 5), 3)

    result = click_protocol(good_then_wrong, None, gt, SPACING, n_clicks=(1, 2))
    assert result["dice"][1] > 0.5
    assert result["dice"][2] == 0.0  # not max(dice[1], dice[2])
    assert result["clicks"][1][1] is True  # the miss left after click 1 is a false negative


def test_protocol_stops_clicking_once_perfect():
    gt = ball((20, 20, 12), 5)

    def oracle(image, coords, labels):
        return gt

    result = click_protocol(oracle, None, gt, SPACING, n_clicks=(1, 3))
    assert len(result["clicks"]) == 1
    assert result["dice"] == {1: 1.0, 3: 1.0} and result["nsd"] == {1: 1.0, 3: 1.0}
    assert result["dice_auc"] == 1.0


def test_dice_auc_is_the_normalised_trapezoid():
    assert dice_auc([0.2, 0.4, 0.6, 0.8]) == pytest.approx(0.5)  # linear: the mean of the end points
    assert dice_auc([0.0, 1.0, 1.0]) == pytest.approx((0.5 + 1.0) / 2)
    assert dice_auc([0.7]) == 0.7
    with pytest.raises(ClickError):
        dice_auc([])
    with pytest.raises(ClickError, match="n_clicks"):
        click_protocol(lambda *a: None, None, ball((20, 20, 12), 5), SPACING, n_clicks=(0, 3))
