"""Recovery: label-free distillation keeps the zeros and the teacher, keeps its best state; the AGP schedule."""

import pytest
import torch
from torch import nn

import prunekit
from prunekit.training.recover import recover
from prunekit.training.schedules import GradualPruner, scheduled_sparsity


def teacher_and_data():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(8, 4, 3)).eval()
    data = [torch.rand(4, 3, 12, 12) for _ in range(5)]
    return teacher, data


@pytest.mark.parametrize("finalized", [False, True], ids=["reparametrized", "finalized"])
def test_zeros_stay_zero_and_the_teacher_is_unchanged(finalized):
    teacher, data = teacher_and_data()
    student = prunekit.apply_plan(prunekit.copy_model(teacher), {"0": 0.5, "2": 0.8, "4": 0.6})
    if finalized:
        prunekit.finalize(student)
    zeros = {name: conv.weight.detach() == 0 for name, conv in prunekit.conv_layers(student).items()}
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    history = recover(student, teacher, data, steps=30, lr=3e-3, eval_every=5, progress=False)
    for name, conv in prunekit.conv_layers(student).items():
        assert bool((conv.weight.detach()[zeros[name]] == 0).all()), name
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert all(p.requires_grad for p in teacher.parameters())
    assert history.best_distortion < history.distortion[0]  # it did recover something


def test_a_learning_rate_that_only_hurts_returns_the_starting_weights():
    teacher, data = teacher_and_data()
    student = prunekit.finalize(prunekit.apply_plan(prunekit.copy_model(teacher), {"2": 0.5}))
    start = {k: v.clone() for k, v in student.state_dict().items()}
    history = recover(student, teacher, data, steps=10, lr=10.0, eval_every=2, progress=False)
    assert history.best_step == 0 and max(history.distortion[1:]) > history.distortion[0]
    assert all(torch.equal(v, start[k]) for k, v in student.state_dict().items())


@pytest.mark.parametrize("frequency", [1, 3])
def test_the_cubic_schedule_is_zhu_and_guptas_formula_and_reaches_the_plan(frequency):
    # s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3 with s_i 0.1, s_f 0.9, t0 4, n dt 18, worked by hand:
    # halfway (9 steps in) 0.9 - 0.8 / 8 = 0.8; a third of the way (6 steps) 0.9 - 0.8 * 8 / 27.
    start, end, initial, final = 4, 22, 0.1, 0.9
    assert scheduled_sparsity(3, initial, final, start, end, frequency) == initial
    assert scheduled_sparsity(4, initial, final, start, end, frequency) == pytest.approx(initial)
    assert scheduled_sparsity(22, initial, final, start, end, frequency) == final
    assert scheduled_sparsity(99, initial, final, start, end, frequency) == final
    if frequency == 1:
        assert scheduled_sparsity(13, initial, final, start, end, 1) == pytest.approx(0.8)
        assert scheduled_sparsity(10, initial, final, start, end, 1) == pytest.approx(0.9 - 0.8 * 8 / 27)
    else:  # updates every 3 steps: step 14 (10 in) holds the value of 9 in; step 12 that of 6 in
        assert scheduled_sparsity(14, initial, final, start, end, 3) == pytest.approx(0.8)
        assert scheduled_sparsity(12, initial, final, start, end, 3) == pytest.approx(0.9 - 0.8 * 8 / 27)
    model = nn.Sequential(nn.Conv2d(3, 10, 3), nn.ReLU(), nn.Conv2d(10, 10, 3))
    pruner = GradualPruner(model, {"0": 0.8, "2": 0.5}, start_step=2, end_step=12, frequency=frequency)
    seen = []
    for _ in range(12):
        pruner.step()
        seen.append(pruner.sparsity("0"))
    assert seen == sorted(seen) and seen[0] < 0.8  # rises gradually, never falls
    assert pruner.done
    assert pruner.sparsity("0") == pytest.approx(0.8, abs=1 / model[0].weight.numel())
    assert pruner.sparsity("2") == pytest.approx(0.5, abs=1 / model[2].weight.numel())
    assert torch.equal(model[0].weight == 0, model[0].weight_mask == 0)  # pruned through torch's masks


def test_the_linear_and_one_shot_schedules():
    assert scheduled_sparsity(5, 0.0, 0.8, 0, 10, schedule="linear") == pytest.approx(0.4)
    assert scheduled_sparsity(2, 0.2, 0.6, 0, 8, schedule="linear") == pytest.approx(0.3)
    assert scheduled_sparsity(3, 0.0, 0.8, 4, 10, schedule="one-shot") == 0.0
    assert scheduled_sparsity(4, 0.0, 0.8, 4, 10, schedule="one-shot") == 0.8
    model = nn.Sequential(nn.Conv2d(3, 10, 3))
    linear = GradualPruner(model, {"0": 0.8}, start_step=0, end_step=4, schedule="linear")
    assert [round(linear.step()["0"], 6) for _ in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert linear.sparsity("0") == pytest.approx(0.8, abs=1 / 270)
    shot = GradualPruner(nn.Sequential(nn.Conv2d(3, 10, 3)), {"0": 0.5}, start_step=2, end_step=5,
                         schedule="one-shot")
    assert shot.step()["0"] == 0.0 and shot.step()["0"] == 0.5


def test_resuming_a_gradual_pruner_equals_an_uninterrupted_run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 10, 3), nn.ReLU(), nn.Conv2d(10, 10, 3))
    twin = prunekit.copy_model(model)
    straight = GradualPruner(model, {"0": 0.7, "2": 0.6}, 0, 10, frequency=2)
    for _ in range(10):
        straight.step()
    first = GradualPruner(twin, {"0": 0.7, "2": 0.6}, 0, 10, frequency=2)
    for _ in range(5):
        first.step()
    saved_model, saved_state = prunekit.copy_model(twin), first.state_dict()
    second = GradualPruner(saved_model, {"0": 0.7, "2": 0.6}, 0, 10, frequency=2)
    second.load_state_dict(saved_state)
    for _ in range(5):
        second.step()
    for name in ("0", "2"):
        assert torch.equal(saved_model[int(name)].weight_mask, model[int(name)].weight_mask)


def test_gradual_pruning_while_distilling_keeps_only_fully_pruned_states():
    teacher, data = teacher_and_data()
    student = prunekit.copy_model(teacher)
    pruner = GradualPruner(student, {"2": 0.8}, start_step=0, end_step=10, frequency=2)
    history = recover(student, teacher, data, steps=20, lr=1e-3, eval_every=2, pruner=pruner, progress=False)
    assert history.best_step >= 10
    assert float((student[2].weight == 0).float().mean()) == pytest.approx(0.8, abs=0.01)


def test_a_channel_plan_is_reached_gradually():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 10, 3), nn.ReLU(), nn.Conv2d(10, 10, 3))
    stats = prunekit.collect_channel_stats(model, [torch.rand(2, 3, 12, 12)])
    pruner = GradualPruner(model, {"0": 0.6}, 0, 6, frequency=2, method="channel", stats=stats)
    seen = [pruner.step()["0"] for _ in range(6)]
    assert seen == sorted(seen) and seen[0] < 0.6 and pruner.sparsity("0") == pytest.approx(0.6)
    dead = (model[0].weight.detach().flatten(1) == 0).all(dim=1)
    assert int(dead.sum()) == 6 and bool((model[0].bias.detach()[dead] == 0).all())


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast"])
def test_recovery_under_autocast_and_on_each_device_keeps_zeros_and_improves(device, autocast):
    teacher, data = teacher_and_data()
    teacher = teacher.to(device)
    student = prunekit.finalize(prunekit.apply_plan(prunekit.copy_model(teacher), {"0": 0.5, "2": 0.8}))
    zeros = student[2].weight.detach() == 0
    history = recover(student, teacher, [x.to(device) for x in data], steps=20, lr=3e-3, eval_every=5,
                      autocast=autocast, progress=False)
    assert bool((student[2].weight.detach()[zeros] == 0).all())
    assert all(p.dtype == torch.float32 for p in student.parameters())  # autocast computes, never stores, low precision
    assert history.best_distortion < history.distortion[0]


def test_ctrl_c_during_recovery_keeps_the_best_state_and_says_so(interrupt_at_adam_step):
    teacher, data = teacher_and_data()
    student = prunekit.finalize(prunekit.apply_plan(prunekit.copy_model(teacher), {"2": 0.8}))
    interrupt_at_adam_step(12)
    history = recover(student, teacher, data, steps=50, lr=3e-3, eval_every=5, progress=False)
    assert history.interrupted and history.steps[-1] == 10  # evaluated at 0, 5, 10; stopped in step 12
    from prunekit.training.recover import _distortion

    assert _distortion(student, teacher, data[-1:], None) == pytest.approx(history.best_distortion)


def test_gradual_recovery_is_never_worse_than_pruning_at_once():
    teacher, data = teacher_and_data()
    plan = {"0": 0.5, "2": 0.8}
    one_shot = prunekit.apply_plan(prunekit.copy_model(teacher), plan)
    student = prunekit.copy_model(teacher)
    pruner = GradualPruner(student, plan, start_step=0, end_step=6, frequency=2)
    history = recover(student, teacher, data, steps=10, lr=10.0, eval_every=2, pruner=pruner, progress=False)
    assert history.best_step == 0 and history.best_distortion == pytest.approx(history.pruned_distortion)
    assert all(torch.equal(v, one_shot.state_dict()[k]) for k, v in student.state_dict().items())


def test_prune_and_recover_ends_at_the_plan_even_when_a_gradual_schedule_is_interrupted():
    from prunekit.training.recover import prune_and_recover

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
    data = [torch.rand(2, 3, 12, 12) for _ in range(4)]

    def stop(step_seconds, total_seconds):
        raise KeyboardInterrupt  # Ctrl-C after the first optimiser step, long before the schedule ends

    history = prune_and_recover(prunekit.copy_model(model), {"0": 0.5, "2": 0.75}, data, 40, gradual=True,
                                progress=False, on_estimate=stop)
    assert history.interrupted and history.rest_pruned_at_once and history.steps_done < 30
    finished = prunekit.copy_model(model)
    history = prune_and_recover(finished, {"0": 0.5, "2": 0.75}, data, 8, gradual=True, progress=False)
    assert not history.interrupted and not history.rest_pruned_at_once
    for layer, level in (("0", 0.5), ("2", 0.75)):
        assert float((finished.get_submodule(layer).weight == 0).float().mean()) == level
