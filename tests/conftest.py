"""Test set-up shared by every test module.

TRITON_INTERPRET must be set before triton is first imported: without a GPU the Triton kernels run
on CPU tensors through the interpreter. On a GPU machine run with TRITON_INTERPRET=0 to test the
compiled kernels.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import gacd_fast  # noqa: E402

# Hypothesis profiles. "ci" (the default, what `make test` runs) is derandomised: the same examples on
# every run and machine, no example database, so the suite's verdict never depends on the draw.
# "long" (`make fuzz`) explores with fresh random draws; each counterexample it finds becomes an
# explicit case in tests/test_fuzz_regressions.py. No deadline: the Triton interpreter and a first
# JIT call are slow, not wrong.
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=20, deadline=None, suppress_health_check=_HEALTH, print_blob=True,
                          derandomize=True, database=None)
settings.register_profile("long", max_examples=1500, deadline=None, suppress_health_check=_HEALTH, print_blob=True)
settings.load_profile(os.environ.get("GACD_FAST_HYPOTHESIS_PROFILE", "ci"))


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed_and_backend():
    torch.manual_seed(0)
    gacd_fast.set_backend(None)
    gacd_fast.set_value_checks(True)
    yield
    gacd_fast.set_backend(None)
    gacd_fast.set_value_checks(True)
