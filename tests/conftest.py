import os
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore", category=FutureWarning)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("ANEFX_TEST_ALL") or config.getoption("-m"):
        return
    skip = pytest.mark.skip(reason="full-size model: run with ANEFX_TEST_ALL=1 (make test-all) or -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True)
settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
