"""Scans at scale: streaming (memory flat in the number of batches), fx suffixes on graphs with side
outputs and residual adds, and torch.distributed (2 gloo processes equal 1)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit
from prunekit.models.hed import HED
from prunekit.sensitivity import OutputDistortion, scan
from prunekit.sensitivity.graph_cut import GraphRunner, live_values, trace
from prunekit.sensitivity.scanner import SuffixFallbackWarning

LEVELS = (0.5, 0.9)


class Residual(nn.Module):
    """conv -> relu -> conv, plus the block's input: a skip connection across the cut."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.b(torch.relu(self.a(x)))
        return self.head(torch.relu(x + y))


class SideOutputs(nn.Module):
    """Each block taps a side output; the head fuses them (HED's shape, small)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.s1 = nn.Conv2d(6, 1, 1)
        self.s2 = nn.Conv2d(6, 1, 1)

    def forward(self, x):
        f1 = torch.relu(self.c1(x))
        f2 = torch.relu(self.c2(nn.functional.max_pool2d(f1, 2)))
        side2 = nn.functional.interpolate(self.s2(f2), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(self.s1(f1) + side2)


def _full_forwards(metric):
    def evaluate(model):
        return metric(model)

    evaluate.name, evaluate.higher_is_better = metric.name, metric.higher_is_better
    return evaluate


def _count_calls(model):
    calls = {}
    for name, conv in prunekit.conv_layers(model).items():
        calls[name] = 0
        conv.register_forward_hook(lambda *args, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


# ---------------------------------------------------------------- the graph pass


def test_the_cut_of_a_residual_block_carries_the_skip():
    traced = trace(Residual())
    names = [node.name for node in live_values(traced, traced.position("b"))]
    assert names == ["relu", "relu_1"]  # the block input (skip) and conv b's input


def test_the_cut_of_a_side_output_model_carries_the_side_branch_and_the_input():
    traced = trace(SideOutputs())
    names = [node.name for node in live_values(traced, traced.position("c2"))]
    assert names == ["x", "relu", "max_pool2d"]  # input (for the size), f1 (for s1), c2's input


@pytest.mark.parametrize("build", [Residual, SideOutputs, lambda: HED().eval()], ids=["residual", "side-outputs", "hed"])
def test_running_from_any_cut_equals_the_model(build):
    model = build().eval()
    traced = trace(model)
    runner = GraphRunner(traced)
    x = torch.rand(2, 3, 19, 23)
    with torch.no_grad():
        expected = model(x)
        for layer in prunekit.conv_layers(model):
            position = traced.position(layer)
            state = runner.advance(runner.start(x), 0, position)
            output, _ = runner.finish(state, position, {})
            assert torch.equal(output, expected), layer


# ---------------------------------------------------------------- scan equality


@pytest.mark.parametrize("build", [Residual, SideOutputs, lambda: HED().eval()], ids=["residual", "side-outputs", "hed"])
def test_fx_suffix_scores_equal_full_forwards_and_skip_the_prefix(build):
    model = build().eval()
    metric = OutputDistortion([torch.rand(2, 3, 16, 16), torch.rand(1, 3, 16, 16)])
    metric.prepare(model)
    naive = scan(model, _full_forwards(metric), sparsities=LEVELS, progress=False)
    first = next(iter(prunekit.conv_layers(model)))
    calls = _count_calls(model)
    # stack_levels=False: every level alone, the bitwise mode (stacked levels equal them to float rounding)
    streamed = scan(model, metric, sparsities=LEVELS, progress=False, cache_limit=0, stack_levels=False)
    streamed_calls, layers = calls[first], len(calls)
    calls[first] = 0
    cached = scan(model, metric, sparsities=LEVELS, progress=False, stack_levels=False)
    assert streamed.scores == naive.scores == cached.scores and streamed.baseline == naive.baseline
    # The first conv runs in prepare + baseline (2 batches each) and in its own points; after that,
    # the cache advances past it once per batch, streaming recomputes it once per batch and layer.
    own_points = 2 * len(LEVELS)
    assert calls[first] == 4 + own_points + 2
    assert streamed_calls == 4 + own_points + 2 * (layers - 1)
    assert streamed_calls < 4 + 2 * layers * len(LEVELS)  # full forwards: every point runs it


def test_untraceable_model_falls_back_with_one_warning_and_the_same_scores():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return y if y.sum() > 0 else -y  # control flow on a value: fx cannot trace it

    model = DataDependent().eval()
    metric = OutputDistortion(torch.rand(2, 3, 8, 8))
    metric.prepare(model)
    with pytest.warns(SuffixFallbackWarning, match="torch.fx cannot trace it") as caught:
        result = scan(model, metric, sparsities=LEVELS, progress=False)
    assert len([w for w in caught if issubclass(w.category, SuffixFallbackWarning)]) == 1
    assert result.scores == scan(model, _full_forwards(metric), sparsities=LEVELS, progress=False).scores


# ---------------------------------------------------------------- memory


def _working_set_peak(model, n_batches, cache_limit, monkeypatch):
    """Peak bytes of the dense states the scan holds at once: the kept prefix states plus the batch in hand.

    Read from the scanner's own accounting (each state's tensors), so other tests' objects never count.
    """
    from prunekit.sensitivity import scanner

    torch.manual_seed(0)
    metric = OutputDistortion([torch.rand(1, 3, 24, 24) for _ in range(n_batches)])
    peak = [0]
    real_state_at = scanner._PrefixCache.state_at

    def probing(cache, batch, inputs, position):
        state = real_state_at(cache, batch, inputs, position)
        in_hand = 0 if batch in cache.entries else GraphRunner.state_bytes(state)
        peak[0] = max(peak[0], cache.used + in_hand)
        return state

    monkeypatch.setattr(scanner._PrefixCache, "state_at", probing)
    scan(model, metric, sparsities=(0.5,), progress=False, cache_limit=cache_limit)
    monkeypatch.setattr(scanner._PrefixCache, "state_at", real_state_at)
    return peak[0]


def test_streaming_memory_does_not_grow_with_the_number_of_batches(monkeypatch):
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 4, 3, padding=1),
    ).eval()
    streaming = [_working_set_peak(model, n, 0, monkeypatch) for n in (2, 8)]
    cached = [_working_set_peak(model, n, 1 << 30, monkeypatch) for n in (2, 8)]
    assert streaming[0] > 0 and streaming[1] == streaming[0]  # one batch's state, whatever the batch count
    assert cached[1] > cached[0] * 2  # the probe sees the cache grow when one is allowed
    bounded = _working_set_peak(model, 8, streaming[0] * 3, monkeypatch)
    assert bounded <= streaming[0] * 3 + streaming[0]  # at most the limit plus the batch in hand


# ---------------------------------------------------------------- torch.distributed

WORKER = textwrap.dedent(
    """
    import gc, json, os, sys, weakref
    import torch
    from torch import nn
    import torch.distributed as dist
    from prunekit.planning import fit_plan
    from prunekit.sensitivity import OutputDistortion, Accuracy, scan

    out = sys.argv[1]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
        group = weakref.ref(dist.group.WORLD)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 144, 10, bias=False)).eval()
    batches = [torch.randn(2, 3, 12, 12) for _ in range(5)]
    with torch.no_grad():  # the dense model's own predictions: accuracy 1 dense, lower pruned
        labels = [model(b).argmax(1) for b in batches]
    distortion = OutputDistortion(batches)
    accuracy = Accuracy(list(zip(batches, labels)))

    def plain(m):  # a plain callable: points are shared out
        return distortion(m)

    plain.name, plain.higher_is_better = "distortion", False
    rank = dist.get_rank() if world > 1 else 0
    written = []
    results = {}
    for name, metric in (("distortion", distortion), ("accuracy", accuracy), ("plain", plain)):
        result = scan(model, metric, sparsities=(0.3, 0.6, 0.9), progress=False,
                      on_point=lambda r, name=name: written.append(name))
        results[name] = {"baseline": result.baseline, "scores": result.scores}
        if name == "distortion":  # a fit whose breaking trials stop early: every rank at the same batch
            fit = fit_plan(model, metric, result, 0.15)
            results["fit"] = {"plan": fit.plan, "kept": [t[3] for t in fit.trials],
                              "scores": [t[2] for t in fit.trials if t[3]]}
    released = None
    if world > 1:
        dist.destroy_process_group()
        gc.collect()
        released = group() is None  # else its gloo threads outlive it, into interpreter shutdown
    with open(f"{out}.rank{rank}.json", "w") as handle:
        json.dump({"results": results, "on_point_calls": len(written), "group_released": released}, handle)
    """
)


def _run_worker(tmp_path, processes):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / f"run{processes}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    if processes == 1:
        command = [sys.executable, str(script), str(out)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(processes), str(script), str(out)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return [json.loads((tmp_path / f"run{processes}.rank{r}.json").read_text()) for r in range(processes)]


@pytest.mark.slow
def test_two_gloo_processes_give_the_one_process_result(tmp_path):
    (single,) = _run_worker(tmp_path, 1)
    ranks = _run_worker(tmp_path, 2)
    for name in ("distortion", "accuracy", "plain"):
        one = single["results"][name]
        for rank in ranks:
            two = rank["results"][name]
            if name == "accuracy":
                assert two == one  # exactly
                assert one["baseline"] == 1.0 and min(min(v) for v in one["scores"].values()) < 1.0
            else:
                assert two["baseline"] == pytest.approx(one["baseline"], rel=1e-9, abs=1e-12)
                for layer, values in one["scores"].items():
                    assert two["scores"][layer] == pytest.approx(values, rel=1e-9, abs=1e-12)
    assert ranks[0]["on_point_calls"] > 0 and ranks[1]["on_point_calls"] == 0  # rank 0 alone reports
    # A scan does not keep the caller's group alive (fake tensors imported torch._dynamo, whose
    # torch.distributed.nn bound it as a default argument: gloo threads at exit, SIGABRT one run in five).
    assert [rank["group_released"] for rank in ranks] == [True, True]
    one = single["results"]["fit"]
    assert not all(one["kept"]) and any(one["plan"].values())
    for rank in ranks:
        two = rank["results"]["fit"]
        assert two["plan"] == one["plan"] and two["kept"] == one["kept"]
        assert two["scores"] == pytest.approx(one["scores"], rel=1e-9, abs=1e-12)


GROUP_WORKER = textwrap.dedent(
    """
    import gc, json, sys, weakref
    import torch
    import torch.distributed as dist
    from prunekit.cli.session import process_group

    with process_group(torch.device("cpu")):
        group = weakref.ref(dist.group.WORLD)
        from torch._subclasses.fake_tensor import FakeTensorMode  # what a command may use inside the group
        FakeTensorMode()  # its first use imports torch._dynamo, and torch.distributed.nn with it
        rank = dist.get_rank()
    gc.collect()
    with open(f"{sys.argv[1]}.rank{rank}.json", "w") as handle:
        json.dump({"released": group() is None, "initialized": dist.is_initialized()}, handle)
    """
)


@pytest.mark.slow
def test_the_cli_process_group_is_gone_when_the_command_ends_whatever_it_imported(tmp_path):
    """A group still referenced after destroy_process_group keeps its gloo threads into interpreter shutdown,
    where one that frees a tensor takes the GIL and aborts the process: a finished command reported as failed."""
    script = tmp_path / "group_worker.py"
    script.write_text(GROUP_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"out.rank{rank}.json").read_text()) == {"released": True, "initialized": False}


@pytest.mark.slow
def test_torchrun_cli_scan_equals_one_process_and_rank_0_alone_writes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["-m", "prunekit", "scan", "--sparsities", "0.5,0.9", "--quiet", "--json"]
    one = subprocess.run([sys.executable, *args, "--out", "one"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=180)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *args, "--out", "two"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    document = json.loads(two.stdout)  # one JSON document: rank 1 printed nothing
    assert document["scan"]["scores"] == json.loads(one.stdout)["scan"]["scores"]  # accuracy: exactly
    plans = [json.loads((tmp_path / name / "plan.json").read_text()) for name in ("two", "one")]
    assert [p.pop("scan") for p in plans] == [str(tmp_path / name / "scan.json") for name in ("two", "one")]
    assert plans[0] == plans[1]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["fit.json", "plan.json", "scan.csv", "scan.json", "sensitivity.png"]


@pytest.mark.slow
def test_torchrun_resume_reads_the_partial_scan_on_rank_0(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["-m", "prunekit", "scan", "--sparsities", "0.5,0.9", "--quiet", "--per-layer", "--out", "r"]
    assert subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, timeout=180).returncode == 0
    full = json.loads((tmp_path / "r" / "scan.json").read_text())
    partial = dict(full, complete=False, scores={k: ([v[0], None] if i else v) for i, (k, v) in enumerate(full["scores"].items())})
    (tmp_path / "r" / "scan.json").write_text(json.dumps(partial))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "r" / "scan.json").read_text())["scores"] == full["scores"]


@pytest.mark.slow
def test_torchrun_settling_scan_stops_every_rank_together_with_one_process_verdicts(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["-m", "prunekit", "scan", "--sparsities", "0.4,0.9", "--metric", "distortion", "--batch-size", "8",
            "--confidence", "0.99", "--quiet", "--json", "--per-layer"]
    one = subprocess.run([sys.executable, *args, "--out", "one"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=180)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *args, "--out", "two"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    single, double = json.loads(one.stdout)["scan"], json.loads(two.stdout)["scan"]
    assert single["estimates"] and any(p for values in single["estimates"].values() for p in values)
    for layer, values in single["estimates"].items():  # the same batches seen, the same verdicts
        for mine, theirs in zip(values, double["estimates"][layer]):
            assert (mine is None) == (theirs is None)
            if mine is not None:
                assert (mine["batches"], mine["within"]) == (theirs["batches"], theirs["within"])
                assert theirs["score"] == pytest.approx(mine["score"], rel=1e-9)
        assert double["scores"][layer] == pytest.approx(single["scores"][layer], rel=1e-9, abs=1e-12)
