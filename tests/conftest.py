"""Test set-up shared by every test module.

TRITON_INTERPRET must be set before triton is first imported: without a GPU the Triton kernels run
on CPU tensors through the interpreter. On a GPU machine run with TRITON_INTERPRET=0 to test the
compiled kernels.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import gacd_fast  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_backend():
    torch.manual_seed(0)
    gacd_fast.set_backend(None)
    gacd_fast.set_value_checks(True)
    yield
    gacd_fast.set_backend(None)
    gacd_fast.set_value_checks(True)
