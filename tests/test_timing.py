"""compare_latency: interleaved medians, models left as they were."""

import pytest
import torch
from torch import nn

from prunekit.timing import compare_latency


def test_returns_a_positive_median_per_model_and_restores_modes():
    wide, narrow = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Dropout()), nn.Conv2d(3, 2, 3)
    wide.train()
    calls = []
    narrow.register_forward_hook(lambda *args: calls.append(1))
    times = compare_latency({"wide": wide, "narrow": narrow}, torch.randn(1, 3, 8, 8), repeats=3, warmup=1)
    assert set(times) == {"wide", "narrow"} and all(t > 0 for t in times.values())
    assert len(calls) == 4  # warmup + repeats, once per round
    assert wide.training and wide[1].training and narrow.training


@pytest.mark.parametrize("kwargs", [{"repeats": 0}, {"warmup": -1}])
def test_bad_counts_are_rejected(kwargs):
    with pytest.raises(ValueError, match="repeats"):
        compare_latency({"m": nn.Identity()}, torch.zeros(1), **kwargs)


def test_empty_models_are_rejected():
    with pytest.raises(ValueError, match="at least one"):
        compare_latency({}, torch.zeros(1))


def test_cuda_inputs_are_timed_between_synchronisations(monkeypatch):
    import torch
    from torch import nn

    from prunekit.timing import latency_samples

    events = []

    class FakeCudaInput(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    x = torch.randn(1, 3, 8, 8).as_subclass(FakeCudaInput)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))

    class Recording(nn.Conv2d):
        def forward(self, input):
            events.append("forward")
            return super().forward(input.as_subclass(torch.Tensor))

    latency_samples({"conv": Recording(3, 4, 3)}, x, repeats=2, warmup=0)
    assert events == ["sync", "forward", "sync"] * 2
