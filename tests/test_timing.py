"""Timing: interleaved rounds (order rotating), medians with their spread, speed-ups with an interval."""

import pytest
import torch
from torch import nn

from prunekit.measure.timing import NOISY_SPAN, compare_latency, latency_samples, speedup, spread


def test_returns_each_models_median_and_restores_modes(monkeypatch):
    import prunekit.measure.timing

    clock = [0.0]
    monkeypatch.setattr(prunekit.measure.timing.time, "perf_counter", lambda: clock[0])
    wide, narrow = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Dropout()), nn.Conv2d(3, 2, 3)
    wide.train()
    # per round an untimed forward, then the timed one (the warm-up round first)
    costs = {"wide": iter([0.0, 9.0, 0.0, 3.0, 0.0, 2.0, 0.0, 4.0]), "narrow": iter([0.0, 7.0, 0.0, 1.0, 0.0, 1.5, 0.0, 0.5])}

    def spend(name):
        def hook(*args):
            clock[0] += next(costs[name])
        return hook

    wide.register_forward_hook(spend("wide"))
    narrow.register_forward_hook(spend("narrow"))
    times = compare_latency({"wide": wide, "narrow": narrow}, torch.randn(1, 3, 8, 8), repeats=3, warmup=1)
    assert times == {"wide": 3.0, "narrow": 1.0}  # the warm-up round (9 and 7) is not counted
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

    from prunekit.measure.timing import latency_samples

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
    assert events == ["forward", "sync", "forward", "sync"] * 2  # the untimed forward, then the timed one between syncs


def test_rounds_rotate_the_order_after_uncounted_warm_up():
    calls = []
    a, b = nn.Identity(), nn.Identity()
    a.register_forward_hook(lambda *args: calls.append("a"))
    b.register_forward_hook(lambda *args: calls.append("b"))
    samples = latency_samples({"a": a, "b": b}, torch.zeros(1), repeats=3, warmup=1)
    assert calls == ["a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b", "b", "b", "a", "a"]
    assert len(samples["a"]) == len(samples["b"]) == 3


def test_a_clear_speedup_is_not_noise_and_equal_timings_are():
    gen = torch.Generator().manual_seed(0)
    noise = (1 + 0.05 * torch.randn(30, generator=gen)).tolist()
    before = [0.010 * n for n in noise]
    twice = speedup(before, [0.005 * n for n in reversed(noise)])
    assert 1.8 < twice.low <= twice.ratio <= twice.high < 2.2 and not twice.within_noise
    same = speedup(before, [0.010 * n for n in reversed(noise)])
    assert same.within_noise and "within noise" in str(same)
    assert speedup(before, before).ratio == 1.0
    # The first round of one model 60x slower (the reported bug): the median ignores it.
    spiked = speedup([0.6] + before[1:], before)
    assert spiked.within_noise


def test_a_speedup_from_a_busy_machine_says_so_and_how_to_measure_it():
    gen = torch.Generator().manual_seed(0)
    noise = (1 + 0.05 * torch.randn(30, generator=gen)).tolist()
    quiet = speedup([0.010 * n for n in noise], [0.005 * n for n in reversed(noise)])
    assert not quiet.too_noisy and str(quiet).startswith(f"{quiet.ratio:.2f}x (95% interval")
    loads = [1.0 if i % 2 else 6.0 for i in range(30)]  # every other round of one model 6x slower
    busy = speedup([0.010 * n for n in loads], [0.005 * n for n in noise])
    assert busy.high > NOISY_SPAN * busy.low and busy.too_noisy
    assert "the machine is busy" in str(busy) and "--threads 1" in str(busy)


def test_spread_and_bad_rounds():
    assert spread([3.0, 1.0, 2.0]) == spread([1.0, 2.0, 3.0])
    assert spread([1.0, 2.0, 3.0, 4.0, 5.0]).q3 == 4.0
    with pytest.raises(ValueError, match="same number"):
        speedup([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        spread([])


def test_each_timed_forward_follows_the_model_itself_and_every_model_takes_every_place(monkeypatch):
    """Timed right after another model, a model paid for that model's data in the caches."""
    import prunekit.measure.timing

    calls, timed = [], []
    clock = [0.0]

    def tick():
        clock[0] += 1.0
        return clock[0]

    monkeypatch.setattr(prunekit.measure.timing.time, "perf_counter", lambda: timed.append(len(calls)) or tick())
    models = {name: nn.Identity() for name in "abc"}
    for name, model in models.items():
        model.register_forward_hook(lambda module, args, out, name=name: calls.append(name))
    latency_samples(models, torch.zeros(1), repeats=6, warmup=0)
    assert len(calls) == 36
    starts = timed[::2]  # perf_counter is read before and after each timed forward
    assert all(calls[i - 1] == calls[i] for i in starts)  # the forward before a timed one is the same model's
    rounds = [[calls[i] for i in starts[r * 3 : r * 3 + 3]] for r in range(6)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert all(sorted(r.index(name) for r in rounds) == [0, 0, 1, 1, 2, 2] for name in models)
