"""Students that learn: the real SwinUNETR-tiny reaches a Dice floor, and a good teacher's targets on unlabelled
cases beat labels alone at equal steps. Seeded; the floors sit well below what the runs measured and well above
what untrained models score (figures beside each assertion)."""
import numpy as np
import pytest
import torch

from tests.recompute import recomputed_scores

SIZE = (64, 64, 32)
SPACING = ["preprocess.spacing_mm=[6.0, 6.0, 6.0]"]


def _data(tmp_path, cases, labelled, unlabelled, val):
    """PreparedData over ``cases`` phantoms: the first ``labelled`` train with labels, the next ``unlabelled``
    are scans only (the students' site), the last ``val`` validate."""
    from configs import load_config
    from data.dataset import load_dataset
    from data.phantom_dataset import write_dataset
    from data.prepare import PreparedData, case_item
    from data.stats import preprocess_spec

    cfg = load_config("demo", SPACING + ["data.site.source=null", "run.device=cpu"])
    root = write_dataset(tmp_path / "phantoms", cases=cases, seed=11, size=SIZE)
    ds = load_dataset(root)
    items = sorted(ds.training, key=lambda c: c["case_id"])
    assert labelled + unlabelled + val <= len(items)
    data = PreparedData(
        root=str(root), labels={int(k): v for k, v in ds.labels.items()}, preprocess=preprocess_spec(cfg["preprocess"]),
        train=[case_item(c, True) for c in items[:labelled]], val=[case_item(c, True) for c in items[-val:]],
        site={"source": "phantoms", "root": str(root), "seed": 11, "labelled": labelled, "unlabelled": unlabelled,
              "labels_withheld": unlabelled},
        site_labelled=[case_item(c, True) for c in items[:labelled]],
        site_unlabelled=[case_item(c, False) for c in items[labelled:labelled + unlabelled]])
    return cfg, data, {c["case_id"]: c for c in items}


def _student_cfg(cfg, steps, roi, **distill):
    cfg = {**cfg, "student": {**cfg["student"], "roi_size": list(roi), "arch": {"window_size": 4, "use_v2": False}},
           "distill": {**cfg["distill"], "steps": steps, "val_every": steps, "batch_size": 1, "warmup_steps": 5,
                       "lr": 3e-3, "schedule": "constant", "lambda_schedule": "constant",
                       "labelled_fraction_end": None, **distill}}  # a constant share, as these figures were measured
    return cfg


@pytest.mark.slow
def test_swinunetr_tiny_learns_from_a_few_phantoms_far_above_chance(tmp_path):
    """The shipped student itself (not a stand-in): 3 labelled phantoms, 150 steps, 4³ windows, 64×32×32 crops.
    Measured (seed 0, 2 threads, the demo's crops without flips): validation mean Dice 0.524 (liver 0.87, spleen 0.73,
    left kidney 0.79, stomach 0.65, aorta 0.63; right kidney and pancreas not yet); with flips at p = 0.1 it was
    0.455. 5 untrained initialisations scored 0.006–0.052
    (liver 0.00–0.32). Which small organ is learnt first varies between runs, so only the mean and the liver
    have floors."""
    from distill.train import train_student
    from student import load_student

    torch.set_num_threads(2)
    cfg, data, _ = _data(tmp_path, cases=5, labelled=3, unlabelled=0, val=2)
    cfg = _student_cfg(cfg, 150, (64, 32, 32))
    result = train_student(cfg, tmp_path / "run", "swinunetr_tiny", 0.0, data=data, out_dir=tmp_path / "tiny",
                           progress=False)
    model, meta = load_student(result.checkpoint)
    assert meta["arch"]["options"]["window_size"] == 4
    scores = recomputed_scores(model, meta["roi_size"], data, data.val)
    print(f"[measured] validation mean Dice {scores['mean']['dice']:.3f}:",
          {k: round(v["dice"], 2) for k, v in scores["per_class"].items()})
    assert scores["mean"]["dice"] == pytest.approx(result.best_dice, abs=1e-6)
    assert scores["mean"]["dice"] > 0.25, scores["mean"]
    assert scores["per_class"]["liver"]["dice"] > 0.6, scores["per_class"]


def _oracle_cache(tmp_path, data, by_id, roi):
    """A teacher cache whose targets are the reference labels (one-hot logits ±4): a teacher as good as can be.
    The cache is made by build_teacher_cache (real manifest and key) and its entries replaced by store_entry."""
    from data.transforms import load_transforms
    from distill.cache import TeacherCache, build_teacher_cache, compress_logits, store_entry
    from tests.stand_in_teacher import ConvTeacher

    cases = data.site_labelled + data.site_unlabelled
    ckpt = tmp_path / "oracle.pt"
    teacher = ConvTeacher(data.num_classes)
    torch.save(teacher.state_dict(), ckpt)
    cache = build_teacher_cache(teacher, cases, load_transforms(data.preprocess, keys=("image",)), tmp_path / "cache",
                                ckpt, data.preprocess, roi, data.num_classes, progress=False)
    load = load_transforms(data.preprocess, keys=("image", "label"))
    manifest = cache.manifest
    for item in cases:
        full = load({**item, "label": by_id[item["case_id"]]["label"]})
        label = torch.as_tensor(np.asarray(full["label"]))[0].long()
        logits = torch.nn.functional.one_hot(label, data.num_classes).permute(3, 0, 1, 2).float() * 8.0 - 4.0
        entry = manifest["entries"][item["case_id"]]
        store_entry(cache.directory, manifest, item, compress_logits(logits, 2), list(label.shape), entry["image_sha256"])
    return TeacherCache(cache.directory)


@pytest.mark.slow
def test_a_good_teacher_on_unlabelled_cases_beats_labels_alone_at_equal_steps(tmp_path):
    """1 labelled + 5 unlabelled phantoms; the same student, steps, seed and validation cases. λ = 0 learns from
    the labelled one; KD (λ = 0.5, class-balanced MSE, pseudo-labels: the demo's loss) from all six through a
    cache of reference-label targets. Training seeds 0 and 1 are compared, since one 200-step run is noisy.
    Measured validation Dice (unet_small, 200 steps, crops without flips as the demo's, slab convolutions; Intel
    Xeon, 2 threads): λ = 0 0.525 / 0.499, KD 0.640 / 0.579, a KD lead of +0.115 / +0.080, +0.098 on average
    against the 0.03 floor. A third seed measured +0.061 before slab convolutions (three-seed mean then +0.088) and
    cost a third of the test's time."""
    from data.transforms import load_transforms
    from distill.train import train_student

    torch.set_num_threads(2)
    cfg, data, by_id = _data(tmp_path, cases=8, labelled=1, unlabelled=5, val=2)
    cfg = _student_cfg(cfg, 200, (32, 32, 32), kd_target="probs", temperature=2.0, pseudo_labels=True,
                       kd_weighting="class_balanced")
    cache = _oracle_cache(tmp_path, data, by_id, [32, 32, 32])
    # The oracle's argmax is the reference label inside the volume (what the pseudo-labels are).
    one = data.site_unlabelled[0]
    ref = np.asarray(load_transforms(data.preprocess, keys=("image", "label"))(
        {**one, "label": by_id[one["case_id"]]["label"]})["label"])[0]
    agree = (cache.load(one["case_id"], ref.shape).argmax(0).numpy() == ref).mean()
    assert agree > 0.97, agree

    gaps = []
    for seed in (0, 1):
        run_cfg = {**cfg, "run": {**cfg["run"], "seed": seed}}
        base = train_student(run_cfg, tmp_path / "run", "unet_small", 0.0, data=data, out_dir=tmp_path / f"l0_{seed}",
                             progress=False)
        kd = train_student(run_cfg, tmp_path / "run", "unet_small", 0.5, cache_dir=cache.directory, data=data,
                           out_dir=tmp_path / f"kd_{seed}", progress=False)
        assert (base.labelled, base.unlabelled, kd.labelled, kd.unlabelled) == (1, 0, 1, 5)
        assert kd.last_step == base.last_step == 200
        gaps.append(kd.best_dice - base.best_dice)
        print(f"[measured] seed {seed}: λ = 0 {base.best_dice:.3f}, KD {kd.best_dice:.3f}")
    assert float(np.mean(gaps)) > 0.03, gaps
