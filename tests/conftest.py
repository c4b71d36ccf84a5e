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


@pytest.fixture
def interrupt_at_adam_step(monkeypatch):
    """``interrupt_at_adam_step(n)``: the n-th ``torch.optim.Adam.step`` raises KeyboardInterrupt (a Ctrl-C)."""

    def arm(n):
        calls = {"n": 0}
        real_step = torch.optim.Adam.step

        def step_then_interrupt(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return real_step(self, *args, **kwargs)

        monkeypatch.setattr(torch.optim.Adam, "step", step_then_interrupt)

    return arm
