"""Shared fixtures. Tests run on CPU with few threads: CI has 2 cores."""
import os
import tempfile
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# deploy's per-machine cache (compiled OpenVINO models, the measured runtime choice): not the user's home
os.environ.setdefault("SAM3D_DEPLOY_CACHE", tempfile.mkdtemp(prefix="sam3d_deploy_cache_"))


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory):
    """A small MSD-layout phantom dataset shared by tests (4 training cases, 1 test case, 64x64x32)."""
    from data.phantom_dataset import write_dataset

    root = tmp_path_factory.mktemp("phantoms")
    write_dataset(root, cases=4, test_cases=1, seed=0, size=(64, 64, 32))
    return root


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test: tiny convolutions run faster so than on two contended ones (2-core CI)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
