"""Study files: every shipped one loads; every bad file is one line naming the file and key, exit 2, no Ray."""

import subprocess
import sys

import pytest

from raydist.config import ConfigError
from raydist.search_space import load_study
from raydist.tune import SEARCH_SPACES, plan_concurrency

SHIPPED = sorted(SEARCH_SPACES.glob("*.yaml"))

VALID = """
num_samples: 6
search: {algorithm: hyperopt, initial_points: 2, seed: 3}
scheduler: {type: asha, grace_period: 2, reduction_factor: 2}
fixed: {dataset: digits, model: resnet8, warmup_epochs: 0.5}
searched:
  lr: {loguniform: [0.01, 2.0]}
  batch_size: {choice: [32, 64]}
  epochs: {randint: [3, 6]}
  weight_decay: {quniform: [0.0, 0.001, 0.0001]}
  num_workers: {qrandint: [1, 2, 1]}
points_to_evaluate:
  - {lr: 0.5, batch_size: 32, epochs: 6, weight_decay: 0.0005, num_workers: 2}
"""


def _write(tmp_path, text, name="study.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_the_shipped_studies_exist_and_load():
    names = {p.stem for p in SHIPPED}
    assert {"digits_quick", "cifar10_wrn", "cifar10_resnet18", "cifar100_resnet50", "fashion_mnist_transfer"} <= names
    for path in SHIPPED:
        study = load_study(str(path))
        assert study.searched and study.description, path
        assert study.metric == "val_acc" and study.mode == "max"


def test_shipped_studies_search_lr_batch_size_or_epochs_and_carry_their_targets():
    studies = {p.stem: load_study(str(p)) for p in SHIPPED}
    for name, study in studies.items():
        assert {"lr", "batch_size"} <= set(study.searched), name
    assert studies["cifar10_wrn"].fixed["model"] == "wrn_dli"
    assert studies["cifar10_wrn"].fixed["target_accuracy"] >= 0.75
    assert studies["cifar100_resnet50"].fixed["model"] == "resnet50"
    assert studies["fashion_mnist_transfer"].fixed["pretrained"] is True


def test_a_valid_study_converts_to_tune_and_validates_every_trial(tmp_path):
    from ray import tune

    study = load_study(_write(tmp_path, VALID))
    assert (study.num_samples, study.search, study.initial_points, study.seed) == (6, "hyperopt", 2, 3)
    assert (study.scheduler, study.grace_period, study.reduction_factor) == ("asha", 2, 2.0)
    assert study.max_epochs == 6  # ASHA's max_t: the top of the epochs range (inclusive)
    space = study.tune_space()
    assert isinstance(space["lr"], tune.search.sample.Float)
    assert isinstance(space["epochs"], tune.search.sample.Integer)
    assert {space["epochs"].lower, space["epochs"].upper} == {3, 7}  # Tune's randint excludes its upper bound
    samples = [{k: v.sample() for k, v in space.items()} for _ in range(50)]
    for sample in samples:
        cfg = study.trial_config(sample)
        assert 0.01 <= cfg.lr <= 2.0 and cfg.batch_size in (32, 64) and 3 <= cfg.epochs <= 6
        assert cfg.model == "resnet8" and cfg.warmup_epochs == 0.5
    assert {s["epochs"] for s in samples} == {3, 4, 5, 6}
    assert study.points_to_evaluate == [{"lr": 0.5, "batch_size": 32, "epochs": 6, "weight_decay": 0.0005,
                                         "num_workers": 2}]
    assert study.per_trial_resources(cluster_has_gpus=False) == (2.0, 0.0)  # the 2-worker trials


def test_set_fixes_a_searched_field_and_coerces_it(tmp_path):
    study = load_study(_write(tmp_path, VALID.split("points_to_evaluate")[0]), {"epochs": "4", "seed": 7})
    assert "epochs" not in study.searched and study.fixed["epochs"] == 4 and study.fixed["seed"] == 7
    assert study.max_epochs == 4


@pytest.mark.parametrize("edit, message", [
    (("num_samples: 6", "num_samples: 6\nsampels: 3"), "unknown key 'sampels'; known keys: description"),
    (("model: resnet8", "model: resnet8, lrr: 3"), "fixed.lrr is not a config field; known: dataset"),
    (("  lr: {loguniform", "  learning_rate: {loguniform"), "searched.learning_rate is not a config field"),
    (("{loguniform: [0.01, 2.0]}", "{lognormal: [0.01, 2.0]}"), "searched.lr: unknown distribution 'lognormal'; known: uniform"),
    (("{loguniform: [0.01, 2.0]}", "{loguniform: [2.0, 0.01]}"), "searched.lr: low 2.0 must be below high 0.01"),
    (("{loguniform: [0.01, 2.0]}", "{loguniform: [0.0, 2.0]}"), "searched.lr: loguniform needs low > 0, got 0.0"),
    (("{loguniform: [0.01, 2.0]}", "{loguniform: [0.01]}"), "searched.lr: loguniform takes 2 numbers"),
    (("{loguniform: [0.01, 2.0]}", "{loguniform: [0.01, abc]}"), "searched.lr: loguniform bounds must be finite numbers"),
    (("{loguniform: [0.01, 2.0]}", "0.3"), "searched.lr must be one distribution"),
    (("{randint: [3, 6]}", "{uniform: [3, 6]}"), "searched.epochs: epochs is an integer; use randint"),
    (("{randint: [3, 6]}", "{randint: [3.5, 6]}"), "searched.epochs: randint bounds must be integers"),
    (("{choice: [32, 64]}", "{choice: [32, big]}"), "batch_size = 'big' is not a valid int"),
    (("{choice: [32, 64]}", "{choice: [0, 64]}"), "--batch-size must be positive, got 0"),
    (("{randint: [3, 6]}", "{randint: [0, 6]}"), "--epochs must be positive, got 0"),
    (("warmup_epochs: 0.5", "warmup_epochs: 4"), "--warmup-epochs 4.0 exceeds --epochs 3"),
    (("model: resnet8", "model: resnet8, lr: 0.1"), "'lr' is both fixed and searched"),
    (("model: resnet8", "model: resnet8, storage_path: /x"), "fixed.storage_path is set per trial by raydist.tune"),
    (("model: resnet8", "model: vgg"), "unknown model 'vgg'"),
    (("grace_period: 2", "grace_period: 9"), "scheduler.grace_period 9 exceeds the most epochs a trial can run (6)"),
    (("reduction_factor: 2", "reduction_factor: 1"), "scheduler.reduction_factor must be a number above 1"),
    (("type: asha", "type: pbt"), "scheduler.type 'pbt' is not one of: asha, fifo"),
    (("algorithm: hyperopt", "algorithm: optuna"), "search.algorithm 'optuna' is not one of: hyperopt, random"),
    (("seed: 3}", "seed: 3, budget: 2}"), "unknown key search.budget; known: algorithm"),
    (("num_samples: 6", "num_samples: 0"), "num_samples must be a positive integer, got 0"),
    (("num_samples: 6", "num_samples: 6\nmetric: accuracy"), "metric 'accuracy' is not one of: val_acc"),
    (("num_samples: 6", "num_samples: 6\nmode: maximize"), "mode 'maximize' is not one of: max, min"),
    (("epochs: 6, weight", "epochs: 6, weight_decay: 0.0005, momentum: 0.9, weight"), "points_to_evaluate[0] must set exactly"),
    (("{lr: 0.5,", "{lr: -0.5,"), "points_to_evaluate[0]: --lr must be positive"),
    (("searched:", "searched: [lr]\nx:"), "unknown key 'x'"),
    (("fixed: {", "fixed: {batch_size: ten, "), "fixed.batch_size: batch_size = 'ten' is not a valid int"),
])
def test_bad_study_is_one_line_naming_the_file_and_key(tmp_path, edit, message):
    old, new = edit
    assert old in VALID
    path = _write(tmp_path, VALID.replace(old, new, 1))
    with pytest.raises(ConfigError) as excinfo:
        load_study(path)
    text = str(excinfo.value)
    assert "\n" not in text and message in text and path in text, text


@pytest.mark.parametrize("text, message", [
    ("searched: {lr: {loguniform: [0.1, 1.0]}\n", "is not valid YAML (line"),
    ("- lr\n- epochs\n", "must hold a mapping"),
    ("fixed: {model: resnet8}\n", "no 'searched' section"),
    ("searched: {}\n", "'searched' is empty"),
])
def test_malformed_files(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_study(path)


def test_set_of_an_unknown_field_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="--set lrate is not a config field"):
        load_study(_write(tmp_path, VALID), {"lrate": 1})


def test_concurrency_comes_from_free_resources_and_never_waits_for_what_cannot_come(tmp_path):
    study = load_study(_write(tmp_path, VALID))  # the largest trial: 2 workers x 1 CPU
    fit = dict(total_cpus=8, total_gpus=0, requested=None, where="the cluster")
    assert plan_concurrency(study, free_cpus=8, free_gpus=0, **fit) == 4
    assert plan_concurrency(study, free_cpus=5, free_gpus=0, **fit) == 2
    assert plan_concurrency(study, free_cpus=1, free_gpus=0, **fit) == 1  # busy now, fits later: one at a time
    assert plan_concurrency(study, free_cpus=64, free_gpus=0, **{**fit, "total_cpus": 64}) == 6  # num_samples
    assert plan_concurrency(study, free_cpus=8, free_gpus=0, **{**fit, "requested": 3}) == 3
    with pytest.raises(ConfigError, match="one trial needs 2 CPUs and 0 GPUs .* but the cluster has 1 CPUs"):
        plan_concurrency(study, free_cpus=1, free_gpus=0, **{**fit, "total_cpus": 1})
    gpu_study = load_study(_write(tmp_path, VALID.replace("model: resnet8", "model: resnet8, use_gpu: true"), "g.yaml"))
    assert plan_concurrency(gpu_study, free_cpus=32, free_gpus=4, **{**fit, "total_cpus": 32, "total_gpus": 4}) == 2
    with pytest.raises(ConfigError, match="needs 2 CPUs and 2 GPUs"):
        plan_concurrency(gpu_study, free_cpus=32, free_gpus=1, **{**fit, "total_cpus": 32, "total_gpus": 1})


def _tune_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "raydist.tune", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


@pytest.mark.parametrize("args, message", [
    (["--search-space", "nope"], "--search-space nope: no such file; shipped studies: cifar100_resnet50"),
    (["--num-samples", "0"], "--num-samples must be a positive integer, got 0"),
    (["--set", "epochs"], "--set 'epochs' must look like KEY=VALUE"),
    (["--set", "epochs=-1"], "--epochs must be positive, got -1"),
    (["--set", "lr=fast"], "--set lr: lr = 'fast' is not a valid float"),
    (["--search", "grid"], "argument --search: invalid choice: 'grid'"),
    (["--resume", "not-an-experiment"], "not a raydist.tune experiment folder"),
    (["--search-space", "cifar10_wrn", "--set", "data_dir=nodata"], "not found in"),
    (["--set", "num_workers=64"], "one trial needs 64 CPUs"),
])
def test_tune_cli_bad_input_exits_2_in_one_line_before_ray(tmp_path, args, message):
    result = _tune_cli(*args, "--storage-path", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "runs").exists()  # nothing written
    assert "Ray" not in result.stdout and "dashboard" not in result.stdout  # no cluster started


def test_tune_list_names_every_shipped_study(tmp_path):
    result = _tune_cli("--list", cwd=tmp_path)
    assert result.returncode == 0
    for path in SHIPPED:
        assert path.stem in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--set", "lr=0.1"], "--resume: lr is searched in this study and cannot be fixed now"),
    (["--num-samples", "9"], "--resume continues the study as it was; drop --num-samples"),
])
def test_resume_keeps_the_study_as_it_was(tmp_path, args, message):
    experiment = tmp_path / "experiment"
    experiment.mkdir()
    (experiment / "study.yaml").write_text(VALID)
    result = _tune_cli("--resume", str(experiment), *args, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == f"raydist.tune: error: {message}", result.stderr
    assert sorted(p.name for p in experiment.iterdir()) == ["study.yaml"]
