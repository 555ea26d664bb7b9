"""Trial points through the sweep machinery (:func:`workbench.sweep.trial_executor`): worker
processes and Ray tasks give the rows this process gives, and bad options are refused before any
point runs."""

import pytest
import torch

from workbench.experiments import dia_stabilisation_evidence as ev
from workbench.recipe import Trial, run_trial
from workbench.sweep import trial_executor


def params(**over):
    base = dict(preset="standard", seed=0, seeds=2, conditions=["no BN"], compare_se=True, model="resnet20",
                device="cpu", evidence_epochs=1, evidence_subset="quick", evidence_image_size=16,
                evidence_train_per_class=2, evidence_test_per_class=1, evidence_batch_size=8, evidence_lr=0.05,
                evidence_width=0.25)
    return {**base, **over}


@pytest.fixture(scope="module")
def data():
    return ev.load_data(params())


@pytest.fixture
def one_thread(monkeypatch):
    """One torch thread here and in every worker (spawned workers inherit OMP_NUM_THREADS), so the
    float sums, and with them the rows, can be compared exactly."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _without_timing(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_worker_processes_give_the_rows_of_this_process(data, one_thread):
    here = ev.run_evidence(params(), data, progress=False)
    with trial_executor(jobs=2) as pool:
        assert pool is not None
        spread = ev.run_evidence(params(), data, progress=False, executor=pool)
    assert len(here["rows"]) == 2 * 3  # 2 seeds x (none, dia, se), one condition
    assert _without_timing(spread["rows"]) == _without_timing(here["rows"])
    for name in ("dia_vs_none", "dia_vs_se"):
        assert [v.to_dict() for v in spread["verdicts"][name]] == [v.to_dict() for v in here["verdicts"][name]]


def test_one_local_job_runs_in_this_process():
    with trial_executor() as executor:
        assert executor is None


@pytest.mark.parametrize("options, words", [
    (dict(jobs=0), "--jobs=0"),
    (dict(executor="slurm"), "allowed: ('local', 'ray')"),
    (dict(gpus_per_point=-1.0), "--gpus-per-point=-1.0"),
    (dict(gpus_per_point=0.5), "apply to --executor ray"),
])
def test_bad_options_are_refused_before_any_point(options, words):
    with pytest.raises(ValueError) as info:
        with trial_executor(**options):
            raise AssertionError("a point ran")
    assert words in str(info.value)


def test_a_failing_point_stops_the_trial_without_waiting_for_the_queue():
    trial = Trial("toy", ("a", "b"), "m", "greater", list(range(8)))
    with pytest.raises(ZeroDivisionError):
        with trial_executor(jobs=2) as pool:
            run_trial(trial, _divide_by_seed_minus_three, executor=pool, progress=False)


def _divide_by_seed_minus_three(arm, seed, setting):
    return {"m": 1.0 / (seed - 3)}


try:
    import ray
except ImportError:
    ray = None


@pytest.mark.skipif(ray is None, reason="the ray extra is not installed")
def test_ray_tasks_give_the_rows_of_this_process(data, one_thread):
    here = ev.run_evidence(params(compare_se=False), data, progress=False)
    try:
        with trial_executor(executor="ray", cpus_per_point=1) as tasks:
            spread = ev.run_evidence(params(compare_se=False), data, progress=False, executor=tasks)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert _without_timing(spread["rows"]) == _without_timing(here["rows"])


def test_pruning_seeds_in_worker_processes_give_the_rows_of_this_process(one_thread):
    from workbench.experiments import pruning_comparison as cmp

    tiny = dict(model="segnet", norm="bn", width=0.125, epochs=1, sparsity_epochs=1, lam=5e-3, batch_size=8,
                lr=3e-3, optimizer="adamw", sparsity_mode="proximal", bn_init=0.5, device="cpu", train_scenes=16,
                test_scenes=8, cpu_threads=1, dataset="digit-scenes", finetune_epochs=1, seed_list=[0, 1],
                flops_targets=[0.6], preset="quick")
    here = cmp.compare_at_flops(tiny, progress=False)
    with trial_executor(jobs=2) as pool:
        spread = cmp.compare_at_flops(tiny, progress=False, executor=pool)
    assert cmp.tidy_rows(spread["rows"]) == cmp.tidy_rows(here["rows"])
    assert "model" in spread["rows"][0] and spread["first_runs"]["plain"]["miou"] == here["first_runs"]["plain"]["miou"]


def test_notebook_execution_parameters_are_checked_before_training(monkeypatch):
    from workbench.experiments import pruning
    from workbench.params import execution_options, resolve_execution

    assert execution_options(resolve_execution({})) == {"jobs": 1, "executor": "local", "gpus_per_point": 0.0,
                                                        "address": None}
    with pytest.raises(ValueError, match=r"gpus_per_point=0.5 apply to executor='ray'"):
        resolve_execution({"gpus_per_point": 0.5})
    with pytest.raises(ValueError, match=r"jobs=0 is out of range"):
        pruning.resolve({"preset": "quick", "device": "cpu", "jobs": 0})
    with pytest.raises(ValueError, match=r"executor='dask' is not allowed; allowed: str one of 'local', 'ray'"):
        pruning.resolve({"preset": "quick", "device": "cpu", "executor": "dask"})
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "ray" else object())
    with pytest.raises(ValueError, match=r"executor='ray' needs Ray"):
        resolve_execution({"executor": "ray"})
