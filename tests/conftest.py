"""Shared test setup: CPU-only, deterministic, small thread count so parallel runs stay fast."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

torch.set_num_threads(1)  # many small ops: one thread is fastest on a shared 2-core machine


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
