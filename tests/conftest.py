"""Shared fixtures: every test starts from the same seed, on one CPU thread."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # The models here are tiny: a second thread only adds synchronisation, which
    # on a CPU shared with other jobs costs more than the convolutions it splits.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(previous)
