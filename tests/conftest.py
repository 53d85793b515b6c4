import os
import sys

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))

# Hypothesis: "ci" (the default) is derandomised, so a failure reproduces on every run and in CI;
# "dev" explores new examples each run (HYPOTHESIS_PROFILE=dev; replay one with --hypothesis-seed=N).
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: threads only contend on a shared machine.  Restored afterwards, so the
    setting never leaks into other tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
