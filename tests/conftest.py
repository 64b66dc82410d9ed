import os
import sys
import warnings
from pathlib import Path

from hypothesis import settings


def _threads_per_worker() -> int:
    """The cores each pytest-xdist worker may use: with ``-n 2`` on 2 cores, torch's and the BLAS
    libraries' default (one thread per core, per process) makes 4 spinning threads on 2 cores, and
    the run spends more time in the kernel than in the tests."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // workers)


if "PYTEST_XDIST_WORKER" in os.environ:  # set by xdist before this file is imported, torch not yet
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(_threads_per_worker()))
    import torch

    torch.set_num_threads(_threads_per_worker())

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore", category=FutureWarning)


settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True)
settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
