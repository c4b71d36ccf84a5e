"""fit_plan: a plan whose layers, pruned together, stay within the tolerance."""

import pytest
import torch
from torch import nn

import prunekit
from prunekit.planning import fit_plan
from prunekit.sensitivity import OutputDistortion, SensitivityResult, evaluate_plan, scan


def _model():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=1),
    ).eval()


@pytest.fixture(scope="module")
def scanned():
    torch.manual_seed(0)
    model = _model()
    metric = OutputDistortion(torch.randn(2, 3, 12, 12))
    return model, metric, scan(model, metric, progress=False)


def test_joint_score_is_within_tolerance_and_measured(scanned):
    model, metric, result = scanned
    fit = fit_plan(model, metric, result, max_drop=0.3)
    assert fit.score <= 0.3
    assert evaluate_plan(model, metric, fit.plan) == pytest.approx(fit.score)
    assert any(level > 0 for level in fit.plan.values())


def test_joint_plan_never_exceeds_each_layers_own_level(scanned):
    model, metric, result = scanned
    per_layer = result.plan(0.3)
    fit = fit_plan(model, metric, result, max_drop=0.3)
    assert all(fit.plan[layer] <= per_layer[layer] for layer in per_layer)


def additive_loss(model):
    """A score that adds up over layers: each conv's share of zero weights costs 0.2, so 0.9 alone is
    within 0.25 and every layer at 0.9 together is not (whatever the seed)."""
    return sum(0.2 * float((conv.weight == 0).float().mean()) for conv in prunekit.conv_layers(model).values())


def test_joint_plan_repairs_a_per_layer_plan_that_fails_together():
    model = _model()
    metric = additive_loss
    result = scan(model, metric, sparsities=(0.5, 0.9), higher_is_better=False, progress=False)
    tolerance = 0.25
    assert result.plan(tolerance) == {layer: 0.9 for layer in result.layers}  # each layer alone: 0.18
    together = evaluate_plan(model, metric, result.plan(tolerance))
    assert together == pytest.approx(0.72, abs=0.01) and together > tolerance  # the losses add up
    assert fit_plan(model, metric, result, max_drop=tolerance).score <= tolerance < together
    fit = fit_plan(model, metric, result, max_drop=tolerance, order="drop")
    assert fit.score <= tolerance < together
    greedy = fit_plan(model, metric, result, max_drop=tolerance, search="greedy", order="drop")
    kept = [trial for trial in greedy.trials if trial[3]]  # the greedy measures one plan per step
    assert len(kept) == sum(result.sparsities.index(level) + 1 for level in greedy.plan.values() if level > 0)
    assert fit.plan == greedy.plan and len(fit.trials) <= len(greedy.trials)


def test_the_bisecting_fit_finds_the_greedy_plan_with_fewer_measurements():
    """On a score that worsens as steps are added, bisecting the greedy order gives the greedy's plan exactly."""
    generator = torch.Generator().manual_seed(3)
    layers = [str(i) for i in range(6)]
    levels = (0.2, 0.4, 0.6, 0.8)
    cost = {layer: float(torch.rand(1, generator=generator)) * 0.1 for layer in layers}

    def loss(plan):  # each layer costs cost * level^2; interactions make the sum 1.5x worse
        return 1.5 * sum(cost[layer] * plan.get(layer, 0.0) ** 2 for layer in layers)

    scores = {layer: [cost[layer] * level**2 for level in levels] for layer in layers}
    result = SensitivityResult("loss", False, 0.0, levels, scores)
    measured = []

    def fake_evaluate_plan(model, evaluate, plan, **kwargs):
        measured.append(dict(plan))
        return loss(plan)

    import prunekit.planning.fit as joint

    original = joint.evaluate_plan
    joint.evaluate_plan = fake_evaluate_plan
    try:
        for tolerance in (0.02, 0.05, 0.1):
            for order in ("weights", "drop"):
                greedy = fit_plan(None, None, result, max_drop=tolerance, search="greedy", order=order, min_gain=0)
                count = len(measured)
                fit = fit_plan(None, None, result, max_drop=tolerance, order=order, min_gain=0)
                assert fit.plan == greedy.plan and fit.score == pytest.approx(greedy.score)
                assert len(measured) - count < count / 2 and fit.score <= tolerance
                measured.clear()
    finally:
        joint.evaluate_plan = original


def test_an_unknown_search_order_or_gain_is_refused():
    result = SensitivityResult("accuracy", True, 0.9, (0.5,), {"0": [0.9]})
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="search='binary' is unknown; choose one of bisect, greedy"):
        fit_plan(model, lambda m: 0.0, result, max_drop=0.1, search="binary")
    with pytest.raises(ValueError, match="order='size' is unknown; choose one of weights, drop"):
        fit_plan(model, lambda m: 0.0, result, max_drop=0.1, order="size")
    with pytest.raises(ValueError, match=r"min_gain=1.5 is outside \[0, 1\)"):
        fit_plan(model, lambda m: 0.0, result, max_drop=0.1, min_gain=1.5)


def _additive_fit(monkeypatch, cost, levels=(0.2, 0.4, 0.6, 0.8)):
    """A result whose joint loss is the sum of its layers' (cost x level); fit_plan measures it exactly."""
    import prunekit.planning.fit as joint

    scores = {layer: [cost[layer] * level for level in levels] for layer in cost}
    result = SensitivityResult("loss", False, 0.0, levels, scores)
    measured = []

    def fake_evaluate_plan(model, evaluate, plan, **kwargs):
        measured.append(dict(plan))
        return sum(cost[layer] * level for layer, level in plan.items())

    monkeypatch.setattr(joint, "evaluate_plan", fake_evaluate_plan)
    return result, measured


def test_the_weights_order_spends_the_tolerance_on_large_layers(monkeypatch):
    """A large layer that costs a little more per level than a small one: ordering by drop alone prunes
    the small layer first and runs out of tolerance; ordering by weights per drop prunes the large one."""
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Conv2d(64, 2, 1))
    result, _ = _additive_fit(monkeypatch, {"0": 0.05, "2": 0.06, "4": 0.05})
    by_drop = fit_plan(model, None, result, max_drop=0.06, order="drop", min_gain=0)
    by_weights = fit_plan(model, None, result, max_drop=0.06)
    assert by_drop.plan["2"] < by_weights.plan["2"] == 0.8  # conv 2 holds 36,864 of the 38,720 weights
    assert by_weights.score <= 0.06 and by_drop.score <= 0.06
    assert by_weights.sparsity > by_drop.sparsity + 0.3
    removed = sum(level * model.get_submodule(layer).weight.numel() for layer, level in by_weights.plan.items())
    assert by_weights.sparsity == pytest.approx(removed / sum(p.numel() for n, p in model.named_parameters() if "weight" in n))


def test_the_fit_stops_once_the_steps_left_could_remove_few_weights(monkeypatch):
    """min_gain: after a break, steps that could add less than min_gain of the weights are not tried."""
    model = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(6)])
    cost = {str(i): 0.01 * (i + 1) for i in range(6)}  # equal sizes: cheapest layers first
    result, measured = _additive_fit(monkeypatch, cost)
    everything = fit_plan(model, None, result, max_drop=0.1, min_gain=0)
    tried_all = len(measured)
    measured.clear()
    early = fit_plan(model, None, result, max_drop=0.1, min_gain=0.2)
    assert everything.left == 0 and 0 < early.left < 0.2
    assert len(measured) <= tried_all and early.score <= 0.1
    assert everything.sparsity >= early.sparsity >= everything.sparsity - early.left - 1e-9


def test_the_fit_never_tries_layers_too_small_to_matter(monkeypatch):
    """Layers whose weights add up to less than min_gain are left out before the search: a small first
    conv costs a whole evaluation per trial and can buy almost nothing."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3))
    result, measured = _additive_fit(monkeypatch, {"0": 0.001, "2": 0.02, "4": 0.03})
    small = 36 / (36 + 2304 + 36864)  # conv 0's share of the weights: 0.09 %
    fit = fit_plan(model, None, result, max_drop=0.05)
    assert all(plan["0"] == 0.0 for plan in measured) and fit.plan["0"] == 0.0
    assert fit.left == pytest.approx(0.8 * small) and fit.score <= 0.05
    measured.clear()
    every = fit_plan(model, None, result, max_drop=0.05, min_gain=0)
    assert any(plan["0"] > 0 for plan in measured) and every.plan["0"] > 0 and every.left == 0
    assert fit.sparsity >= every.sparsity - fit.left - 1e-9


def test_zero_tolerance_on_sensitive_model_gives_dense_plan():
    result = SensitivityResult("accuracy", True, 0.9, (0.5, 0.9), {"0": [0.5, 0.1]})
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.warns(UserWarning, match="the plan prunes nothing"):
        fit = fit_plan(model, lambda m: 0.0, result, max_drop=0.01)
    assert fit.plan == {"0": 0.0} and fit.score == 0.9 and fit.trials == []


def test_incomplete_scan_is_refused():
    result = SensitivityResult("accuracy", True, 0.9, (0.5,), {"0": [None]})
    with pytest.raises(ValueError, match="not complete"):
        fit_plan(nn.Sequential(nn.Conv2d(3, 4, 3)), lambda m: 0.0, result, max_drop=0.1)


def test_evaluate_plan_accepts_what_apply_plan_accepts(scanned):
    model, metric, _ = scanned
    plan = {"0": 1.0, "2": 0.5}
    pruned = prunekit.apply_plan(prunekit.copy_model(model), plan)
    assert evaluate_plan(model, metric, plan) == pytest.approx(metric(pruned))
    with pytest.raises(ValueError, match="outside"):
        evaluate_plan(model, metric, {"0": 1.5})


def test_plan_scores_from_kept_dense_prefixes_equal_full_forwards():
    from prunekit.methods.registry import get_method
    from prunekit.sensitivity.scoring import PlanScorer

    torch.manual_seed(0)
    model = _model()
    for metric in (OutputDistortion([torch.randn(2, 3, 12, 12), torch.randn(1, 3, 12, 12)]),
                   OutputDistortion(torch.randn(2, 3, 12, 12), layers=["2"])):
        metric.prepare(model)
        scorer = PlanScorer(model, metric, get_method("fine-grained"), cache_limit=1 << 20)
        # Cuts that move later, earlier and later again: kept states must never be reused past their cut.
        for plan in ({"4": 0.5}, {"6": 0.7}, {"2": 0.5, "6": 0.5}, {"0": 0.3}, {"4": 0.9, "6": 0.2}):
            full = evaluate_plan(model, metric, plan)
            assert evaluate_plan(model, metric, plan, scorer=scorer) == full
        scorer.release()
    assert not any(hasattr(m, "weight_mask") for m in model.modules())


class _Residual(nn.Module):
    """In-place ReLUs and a skip connection: a kept state must not be written by the runs that start from it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(4))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.a(x)
        y = self.b(x)
        x = self.relu(x)  # writes a's output, which the state kept before b holds
        y = self.relu(self.c(y)) + x
        return self.d(y)


def test_plan_scores_from_kept_states_equal_full_forwards_and_skip_what_an_earlier_run_computed():
    """Trials start from the latest state an earlier run kept for the same levels before it: the base's
    (after rebase(plan)), or another trial's, which shares its first layers (a bisection's trials)."""
    from prunekit.methods.registry import get_method
    from prunekit.sensitivity.scoring import PlanScorer

    torch.manual_seed(0)
    model = _Residual().eval()
    metric = OutputDistortion([torch.randn(2, 4, 8, 8), torch.randn(3, 4, 8, 8)])
    metric.prepare(model)
    calls = {name: 0 for name in "abcd"}
    for name in calls:
        model.get_submodule(name).register_forward_hook(lambda *args, name=name: calls.__setitem__(name, calls[name] + 1))
    scorer = PlanScorer(model, metric, get_method("fine-grained"))
    # plan -> the convs it runs (on both batches) when scored after the plans before it
    rounds = [({}, {(("c", 0.5),): "abcd", (("b", 0.5), ("c", 0.5)): "bcd",
                    (("b", 0.5), ("d", 0.3)): "cd"}),  # the state before c with b at 0.5: the trial before's
              ({"a": 0.4}, {(("a", 0.4), ("d", 0.5)): "abcd", (("a", 0.4), ("c", 0.6)): "c" + "d",
                            (("a", 0.4), ("d", 0.7)): "d", (("a", 0.4), ("b", 0.3)): "bcd"}),
              ({"a": 0.4, "b": 0.3}, {(("a", 0.4), ("b", 0.3), ("d", 0.2)): "d",  # kept by that trial: the new base
                                      (("a", 0.4), ("b", 0.3), ("d", 0.4)): "d",
                                      (("a", 0.6), ("b", 0.3)): "abcd"})]
    for base, trials in rounds:
        scorer.rebase(base)
        for plan, convs in trials.items():
            plan = dict(plan)
            full = evaluate_plan(model, metric, plan)  # full forwards: every conv runs on both batches
            before = dict(calls)
            assert evaluate_plan(model, metric, plan, scorer=scorer) == full  # bitwise
            assert {name: calls[name] - before[name] for name in calls} == {name: 2 * (name in convs) for name in calls}, plan
    assert scorer.used > 0
    scorer.release()
    assert scorer.used == 0 and not any(hasattr(m, "weight_mask") for m in model.modules())


def test_kept_states_count_shared_tensors_once_and_keep_the_precious_ones():
    from prunekit.sensitivity.scoring import KeptStates

    skip, a, b, c = (torch.zeros(256) for _ in range(4))  # 1 KiB each
    kept = KeptStates(limit=3 * 1024)
    kept.put((0, 1, ()), {"skip": skip, "x": a}, precious=True)
    kept.put((0, 2, ()), {"skip": skip, "x": b}, precious=False)  # the skip tensor is counted once
    assert kept.used == 3 * 1024 and len(kept.entries) == 2
    kept.put((0, 3, ()), {"x": c}, precious=False)  # room made from the other non-precious state only
    assert set(kept.entries) == {(0, 1, ()), (0, 3, ())} and kept.used == 3 * 1024
    kept.put((0, 4, ()), {"y": torch.zeros(512)}, precious=False)  # would need the precious state's room
    assert (0, 4, ()) not in kept.entries and kept.used <= kept.limit
    kept.put((0, 5, ()), {"y": torch.zeros(512)}, precious=True)  # drops the least recently used first
    assert set(kept.entries) == {(0, 5, ())} and kept.used == 2 * 1024
    assert kept.get((0, 5, ())) is not None and kept.get((0, 1, ())) is None
    kept.clear()
    assert kept.used == 0 and not kept.entries


def test_kept_states_stay_within_their_budget_the_bases_kept_first():
    from prunekit.methods.registry import get_method
    from prunekit.sensitivity.scoring import PlanScorer

    torch.manual_seed(0)
    model = _Residual().eval()
    metric = OutputDistortion([torch.randn(2, 4, 8, 8), torch.randn(3, 4, 8, 8)])
    metric.prepare(model)
    state = 2 * 4 * 8 * 8 * 4  # bytes of one activation of the first batch
    scorer = PlanScorer(model, metric, get_method("fine-grained"), cache_limit=12 * state)
    scorer.rebase({"a": 0.4})
    for plan in ({"a": 0.4, "d": 0.5}, {"a": 0.4, "b": 0.5}, {"a": 0.4, "b": 0.6}, {"a": 0.4, "b": 0.7, "c": 0.2}):
        assert evaluate_plan(model, metric, plan, scorer=scorer) == evaluate_plan(model, metric, plan)
        assert scorer.used <= 12 * state
        base = [key for key, (precious, _) in scorer.kept.entries.items() if precious]
        assert base and all(dict(key[2]).get("a") == 0.4 for key in base if key[1] > 1)
    # The base's states are kept while other trials' fill what is left: the base's state before d is there.
    before_d = scorer.traced.position("d")
    assert any(key[1] == before_d and key[2] == (("a", 0.4),) for key in scorer.kept.entries)
    scorer.release()


class _Unbounded(OutputDistortion):
    """OutputDistortion that cannot bound its final score: every trial runs on every batch."""

    def best_final_score(self, partial):
        return None


def _counting(metric):
    counted = {"batches": 0}
    original = metric.batch_statistics

    def batch_statistics(outputs, target):
        counted["batches"] += 1
        return original(outputs, target)

    metric.batch_statistics = batch_statistics
    return counted


def test_trials_that_break_stop_once_certain_and_change_nothing_else():
    """The fit stops a breaking trial at the first batch after which no batch left could bring it back."""
    torch.manual_seed(0)
    model = _model()
    batches = [torch.randn(2, 3, 12, 12) for _ in range(8)]
    result = scan(model, OutputDistortion(batches), progress=False)
    stopping, unbounded = OutputDistortion(batches), _Unbounded(batches)
    counted, every = _counting(stopping), _counting(unbounded)
    fit = fit_plan(model, stopping, result, max_drop=0.3)
    full = fit_plan(model, unbounded, result, max_drop=0.3)
    assert fit.plan == full.plan and fit.score == full.score and any(fit.plan.values())
    assert [t[3] for t in fit.trials] == [t[3] for t in full.trials] and not all(t[3] for t in fit.trials)
    for mine, theirs in zip(fit.trials, full.trials):
        if mine[3]:
            assert mine[2] == theirs[2]  # a plan that holds is scored on every batch
        else:
            assert theirs[2] > 0.3  # the exact score breaks the tolerance too
    assert counted["batches"] < every["batches"]


def test_evaluate_plan_with_a_tolerance_stops_a_breaking_plan_and_scores_a_holding_one_exactly():
    from prunekit.methods.registry import get_method
    from prunekit.sensitivity.scoring import PlanScorer
    from prunekit.sensitivity.settle import Estimate, Tolerance

    torch.manual_seed(0)
    model = _model()
    metric = OutputDistortion([torch.randn(2, 3, 12, 12) for _ in range(6)])
    metric.prepare(model)
    tolerance = Tolerance(baseline=0.0, higher_is_better=False, max_drop=0.2)
    heavy, light = {"0": 0.9, "2": 0.9, "4": 0.9}, {"6": 0.1}
    for scorer in (None, PlanScorer(model, metric, get_method("fine-grained"))):  # full forwards, kept states
        exact = evaluate_plan(model, metric, heavy)
        assert exact > 0.2
        stopped = evaluate_plan(model, metric, heavy, tolerance=tolerance, scorer=scorer)
        assert isinstance(stopped, Estimate) and not stopped.within
        assert stopped.batches < 6 and stopped.total == 6
        assert 0.2 < stopped.low <= exact and stopped.high == float("inf")
        held = evaluate_plan(model, metric, light, tolerance=tolerance, scorer=scorer)
        assert held == evaluate_plan(model, metric, light) <= 0.2  # bitwise the exact score
    assert not any(hasattr(m, "weight_mask") for m in model.modules())


def test_best_final_scores_bound_every_prefix_and_meet_the_score_at_the_end():
    from prunekit.sensitivity import Accuracy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 10 * 10, 3)).eval()
    batches = [torch.randn(3, 3, 12, 12) for _ in range(5)]
    labels = [torch.randint(0, 3, (3,)) for _ in range(5)]
    distortion, accuracy = OutputDistortion(batches), Accuracy(list(zip(batches, labels)))
    assert distortion.best_final_score(torch.zeros(2, dtype=torch.float64)) is None  # no reference yet
    assert accuracy.best_final_score(torch.zeros(2, dtype=torch.float64)) is None  # no pass has counted the samples
    dense = {name: p.detach().clone() for name, p in model.named_parameters()}
    distortion.prepare(model)
    with torch.no_grad():
        model[0].weight.mul_(torch.rand_like(model[0].weight))  # another model than the reference
    for metric in (distortion, accuracy):
        final = metric(model)
        rows = [stats for _, stats in metric.each_batch(model)]
        totals = torch.zeros_like(rows[0])
        for count, stats in enumerate(rows, start=1):
            totals = totals + stats
            best = metric.best_final_score(totals)
            assert (best >= final) if metric.higher_is_better else (best <= final)
        assert best == final
    model.load_state_dict(dense, strict=False)


def test_the_fit_selects_each_layers_magnitudes_once_per_level(monkeypatch, scanned):
    import functools

    import prunekit.methods.fine_grained as fine_grained
    import prunekit.planning.fit as joint
    from prunekit.sensitivity.scoring import PlanScorer

    model, metric, result = scanned
    made, selected = [], []

    class Counting(fine_grained.MagnitudeSelector):
        def __init__(self, tensor):
            made.append(tensor.data_ptr())
            super().__init__(tensor)

        def smallest(self, count):
            if count and count not in self._cuts:  # a selection (count 0 selects nothing)
                selected.append((id(self), count))
            return super().smallest(count)

    monkeypatch.setattr(fine_grained, "MagnitudeSelector", Counting)
    fit = fit_plan(model, metric, result, max_drop=0.3)
    assert len(fit.trials) > len(result.layers)  # layers are pruned in more trials than there are layers
    assert len(made) == len(set(made)) <= len(result.layers)  # one selector per layer for the whole fit
    assert len(selected) == len(set(selected))  # each level of each layer selected once
    made.clear()
    monkeypatch.setattr(joint, "PlanScorer", functools.partial(PlanScorer, mask_limit=0))  # nothing kept
    assert fit_plan(model, metric, result, max_drop=0.3).plan == fit.plan
    assert len(made) > len(set(made))


def test_a_scorer_keeps_mask_makers_only_for_the_same_statistics():
    from prunekit.methods.registry import get_method
    from prunekit.sensitivity.scoring import PlanScorer

    model = _model()
    pruning = get_method("fine-grained")
    scorer = PlanScorer(model, OutputDistortion(torch.randn(1, 3, 12, 12)), pruning)
    blocks = pruning.blocks(model, ["0"])
    first = scorer.masker(pruning, blocks, None, ("l2", 1))
    assert scorer.masker(pruning, pruning.blocks(model, ["2"]), None, ("l2", 1)) is first
    assert scorer.masker(pruning, blocks, None, ("l0", 1)) is not first
    scorer.release()
    assert scorer.masker(pruning, blocks, None, ("l0", 1)) is not first


def test_steps_the_scan_saw_cost_nothing_are_not_taken_at_once(monkeypatch):
    """A metric that counts (accuracy on a few hundred images) sees no drop for most steps alone: the first
    guess keeps to one layer, and once a plan uses over half the tolerance, trials add one unseen step at a time."""
    import prunekit.planning.fit as joint

    levels = (0.2, 0.4, 0.6, 0.8)
    layers = [str(i) for i in range(6)]
    scores = {layer: [1.0] * len(levels) for layer in layers}  # no layer alone loses a sample
    result = SensitivityResult("accuracy", True, 1.0, levels, scores)
    measured = []

    def fake_evaluate_plan(model, evaluate, plan, **kwargs):  # one sample of 250 lost per 0.8 of summed levels
        measured.append(dict(plan))
        return 1.0 - 0.004 * int(sum(plan.values()) / 0.8 + 1e-9)

    monkeypatch.setattr(joint, "evaluate_plan", fake_evaluate_plan)
    greedy = fit_plan(None, None, result, max_drop=0.01, search="greedy", min_gain=0)
    every = len(measured)
    measured.clear()
    fit = fit_plan(None, None, result, max_drop=0.01, min_gain=0)
    assert fit.plan == greedy.plan and fit.score == pytest.approx(greedy.score)
    assert len(measured) < 2 * every / 3  # 9 of the greedy's 15 (guessing every unseen step at once: 13)

    def steps(plan):
        return sum(round(level / 0.2) for level in plan.values())

    assert sum(level > 0 for level in measured[0].values()) == 1  # the first guess: one layer's steps
    crowded = None  # the latest plan measured to hold with over half the tolerance used
    for plan, (_, _, score, kept) in zip(measured, fit.trials):
        if crowded is not None:
            assert steps(plan) - steps(crowded) == 1
        if kept and 1.0 - score > 0.005:
            crowded = plan
    assert crowded is not None
