"""training.batches: batch k of a run is drawn from (seed, k) alone, so a resumed run trains on the batches an
uninterrupted one trains on, with loader workers or without."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import Dataset

from data.transforms import random_crop_transforms
from distill.sampling import LabelledShareSampler
from training import TrainSettings, fit
from training.batches import crop_batches
from training_toy import TinySegNet, loss_fn, make_val_fn


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cases(n=5):
    rng = np.random.default_rng(0)
    cases = []
    for i in range(n):
        image = rng.normal(size=(1, 24, 22, 20)).astype(np.float32)
        label = (image > 0.5).astype(np.float32)
        cases.append({"image": torch.from_numpy(image), "label": torch.from_numpy(label), "case_id": f"c{i}"})
    return cases


def _dataset(n=5):
    # Every random part the stages use: class-balanced crops, flips, rotations, affine, intensity jitter.
    transform = random_crop_transforms([16, 16, 16], 2, num_samples=1, flip_prob=0.5, rotate_prob=0.5,
                                       affine_prob=0.5, intensity_prob=0.5)
    return Dataset(_cases(n), transform=transform)


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def _same(a, b):
    return all(torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"]) for x, y in zip(a, b))


def test_batch_k_depends_on_the_seed_and_k_alone_and_leaves_the_global_rng_alone():
    batches = crop_batches(_dataset(), batch_size=2)
    state = torch.get_rng_state()
    straight = _take(batches.start(seed=5, step=0), 6)
    assert torch.equal(torch.get_rng_state(), state)  # the training step's draws keep their own stream
    torch.manual_seed(123)  # whatever the global RNG holds
    assert _same(_take(batches.start(seed=5, step=3), 3), straight[3:])
    other = _take(batches.start(seed=6, step=0), 6)
    assert not any(torch.equal(a["image"], b["image"]) for a, b in zip(other, straight))
    assert straight[0]["image"].shape == (2, 1, 16, 16, 16)


def test_every_case_once_per_pass_and_the_order_changes_between_passes():
    data = [{"x": torch.tensor([float(i)])} for i in range(6)]
    stream = crop_batches(data, batch_size=2).start(seed=0, step=0)
    passes = [torch.cat([next(stream)["x"] for _ in range(3)]).flatten().tolist() for _ in range(2)]
    assert sorted(passes[0]) == sorted(passes[1]) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert passes[0] != passes[1]


def test_loader_workers_draw_the_same_batches_as_the_loop_itself():
    # In a fresh process: forking loader workers from a process that has run OpenVINO (other tests of this suite)
    # crashed that process later on. The pipeline trains before it exports, so its workers fork before OpenVINO runs.
    script = (
        "import torch, test_crop_batches as t\n"
        "from training.batches import crop_batches\n"
        "a = t._take(crop_batches(t._dataset(), batch_size=2).start(seed=1, step=4), 4)\n"
        "b = t._take(crop_batches(t._dataset(), batch_size=2, num_workers=2).start(seed=1, step=4), 4)\n"
        "print('same' if t._same(a, b) and len(b) == 4 else 'differ')\n")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "same"


class Stop(Exception):
    pass


@pytest.mark.parametrize("share", [False, True], ids=["shuffled", "labelled_share"])
def test_a_resumed_run_with_real_crops_ends_identical_to_an_uninterrupted_one(tmp_path, share):
    def batches():
        sampler = LabelledShareSampler(2, 3, 0.5, 1.0, steps=12) if share else None
        return crop_batches(_dataset(), batch_size=2, sampler=sampler)

    def settings():
        return TrainSettings(steps=12, lr=1e-2, warmup_steps=1, schedule="constant", val_every=6, seed=3, progress=False)

    def model():
        torch.manual_seed(0)
        return TinySegNet()

    straight = model()
    fit(straight, loss_fn, batches(), settings(), tmp_path / "straight", val_fn=make_val_fn())

    def kill_at_6(step, metrics):
        if step == 6:
            raise Stop

    with pytest.raises(Stop):
        fit(model(), loss_fn, batches(), settings(), tmp_path / "killed", val_fn=make_val_fn(), on_validation=kill_at_6)
    torch.manual_seed(999)  # a new process: the global RNG holds anything
    resumed = model()
    result = fit(resumed, loss_fn, batches(), settings(), tmp_path / "killed", val_fn=make_val_fn())
    assert result.resumed_from == 6
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
