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


@pytest.fixture
def runner(tmp_path, monkeypatch):
    """A click CliRunner, in a fresh working folder (``tmp_path``)."""
    from click.testing import CliRunner

    monkeypatch.chdir(tmp_path)
    return CliRunner()


@pytest.fixture
def one_error_line():
    """``one_error_line(result, *fragments, code=1)``: the command failed cleanly, as every command must.

    Exit ``code``, no traceback, no uncaught exception, and exactly one ``Error:`` line on stderr, its
    last (status notes may precede it), holding every fragment.
    """

    def check(result, *fragments, code=1):
        assert result.exit_code == code, (result.exit_code, result.stderr)
        assert isinstance(result.exception, SystemExit)  # a clean exit, not an uncaught exception
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        errors = [line for line in lines if line.startswith("Error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
        for fragment in fragments:
            assert fragment in errors[0], errors[0]

    return check
