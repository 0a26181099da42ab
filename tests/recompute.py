"""Figures recomputed independently of the code under test: a model's Dice on prepared cases, and clicks replayed
one by one. Tests compare what training, evaluation or the report recorded against these."""
import numpy as np
import torch


def recomputed_scores(model, roi_size, data, items, clean=()):
    """Dice of ``model`` on ``items`` (prepared cases), recomputed with evaluation/ (sliding window, ``case_metrics``,
    ``summarize``), not with the training loop's ``validation_dice`` or the evaluation stage. ``clean``: classes whose
    largest 26-connected piece alone is kept (scipy's labelling, not deploy.postprocess); the voxels of the other
    pieces take their next most likely class."""
    from data.transforms import load_transforms
    from evaluation.metrics import case_metrics, summarize
    from evaluation.sliding_window import predict_logits

    load, rows = load_transforms(data.preprocess, keys=("image", "label")), []
    for item in items:
        case = load(dict(item))
        logits = predict_logits(model, torch.as_tensor(case["image"]), roi_size, data.num_classes, overlap=0.25)
        logits = torch.as_tensor(logits).numpy()
        raw = logits.argmax(0)
        pred = raw
        for k in clean:
            pred = largest_piece_only(raw, logits, k, out=pred)
        rows += [{**r, "case": item["case_id"]} for r in
                 case_metrics(pred, np.asarray(case["label"])[0], data.preprocess["spacing_mm"], data.labels)]
    return summarize(rows)


def largest_piece_only(pred, logits, k, out=None):
    """``out`` (default ``pred``) with every 26-connected piece of class k in ``pred`` but the largest given its next
    most likely class. The pieces are those of ``pred``, the raw argmax, whatever other classes cleaned before moved
    (as deploy.postprocess does: each voxel has one raw class, so the order of the classes does not matter)."""
    from scipy import ndimage

    out = pred if out is None else out
    pieces, count = ndimage.label(pred == k, structure=np.ones((3, 3, 3)))
    if count < 2:
        return out
    sizes = ndimage.sum(np.ones_like(pieces), pieces, index=np.arange(1, count + 1))
    drop = (pieces > 0) & (pieces != 1 + int(np.argmax(sizes)))
    others = logits.copy()
    others[k] = -np.inf
    out = out.copy()
    out[drop] = others[:, drop].argmax(0)
    return out


def replayed_clicks(model, case, labels, spacing, roi_size, mode, n_clicks, nsd_tolerance_mm):
    """``{class id: [{"dice", "nsd"} after click 1, 2, ...]}`` for one preprocessed case: the clicks placed one by one
    with ``evaluation.clicks.next_click``, answered by a fresh ``teacher.clicks.click_segmenter`` per organ, each mask
    scored by ``evaluation.metrics.mask_metrics`` (not through ``click_protocol`` or ``summarize_clicks``)."""
    from evaluation.clicks import next_click
    from evaluation.metrics import mask_metrics
    from teacher.clicks import click_segmenter

    image = torch.as_tensor(np.asarray(case["image"], dtype=np.float32))
    label = np.asarray(case["label"])[0]
    out = {}
    for class_id in sorted(c for c in labels if c):
        target = label == class_id
        if not target.any():
            continue
        segment = click_segmenter(model, class_id, roi_size, mode)
        pred, clicks, out[class_id] = np.zeros_like(target), [], []
        for _ in range(n_clicks):
            click = next_click(pred, target, spacing)
            if click is not None:
                clicks.append(click)
                mask = segment(image, np.array([xyz for xyz, _ in clicks]), np.array([int(p) for _, p in clicks]))
                pred = np.asarray(mask).astype(bool)
            out[class_id].append(mask_metrics(pred, target, spacing, nsd_tolerance_mm, hd95=False))
    return out
