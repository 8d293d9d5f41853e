"""Study files: every shipped one loads; every bad file is one line naming the file and key, exit 2, no Ray;
what HyperOpt and random search really sample matches the file; trials under ASHA are compared fairly.

The sampling tests run Ray's HyperOptSearch and BasicVariantGenerator in this process (no cluster).
"""

import math
import os
import subprocess
import sys
from collections import Counter

import pytest

from cli import run_main

from raydist.errors import ConfigError
from raydist.study.distributions import MAX_GRID
from raydist.study.study_file import load_study
from raydist.tune import SEARCH_SPACES
from raydist.ray_edge.study import plan_concurrency
from raydist.ray_edge.search import tune_space

SHIPPED = sorted(SEARCH_SPACES.glob("*.yaml"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A small image folder for the shipped study that trains on one (folder_transfer: --set data_dir=...)."""
    from image_folders import write_digits_folder

    root = tmp_path_factory.mktemp("photos")
    write_digits_folder(root, per_class=20)
    return str(root)


def _load_shipped(path, photos):
    """A shipped study as a user runs it: a folder study with its --set data_dir=..."""
    text = path.read_text()
    return load_study(str(path), {"data_dir": photos} if "dataset: folder" in text else None)

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


def test_the_shipped_studies_exist_and_load(photos):
    names = {p.stem for p in SHIPPED}
    assert {"digits_quick", "cifar10_wrn", "cifar10_resnet18", "cifar100_resnet50", "fashion_mnist_transfer",
            "digits_transfer", "folder_transfer"} <= names
    for path in SHIPPED:
        study = _load_shipped(path, photos)
        assert study.searched and study.description, path
        # Ray Tune's CIFAR tutorial ranks by validation loss, as its study here does; the rest by accuracy
        assert (study.metric, study.mode) == (("val_loss", "min") if path.stem == "cifar10_tune_cnn" else
                                              ("val_acc", "max")), path


def test_shipped_studies_search_lr_batch_size_or_epochs_and_carry_their_targets(photos):
    studies = {p.stem: _load_shipped(p, photos) for p in SHIPPED}
    for name, study in studies.items():
        # the shape study searches depth and width; PBT's perturbs what can change mid-run
        assert {"lr", "batch_size"} <= set(study.searched) or name in ("cifar10_wrn_shape", "digits_pbt"), name
    assert studies["cifar10_wrn"].fixed["model"] == "wrn_dli"
    assert studies["cifar10_wrn"].fixed["target_accuracy"] >= 0.75
    assert studies["cifar100_resnet50"].fixed["model"] == "resnet50"
    # a global batch of 8,192 is inside its warmup at any early rung: ASHA would cull large batches by
    # construction, so the batch study runs every trial to the end (FIFO)
    assert studies["cifar10_resnet18"].scheduler == "fifo" and "batch_size" in studies["cifar10_resnet18"].searched
    assert studies["fashion_mnist_transfer"].fixed["pretrained"] is True
    assert studies["folder_transfer"].fixed["dataset"] == "folder"
    assert studies["digits_pbt"].scheduler == "pbt" and "lr" in studies["digits_pbt"].searched
    for name in ("fashion_mnist_transfer", "digits_transfer", "folder_transfer"):  # how to fine-tune is searched
        assert set(studies[name].searched["finetune"].args) == {"full", "linear", "gradual", "lp-ft"}


def test_the_tune_tutorial_study_searches_the_networks_shape_as_the_tutorial_does(photos):
    study = _load_shipped(next(p for p in SHIPPED if p.stem == "cifar10_tune_cnn"), photos)
    powers = (4, 8, 16, 32, 64, 128, 256)
    assert study.searched["model_args.l1"].args == study.searched["model_args.l2"].args == powers
    assert (study.searched["lr"].kind, study.searched["lr"].args) == ("loguniform", (1e-4, 1e-1))
    assert study.searched["batch_size"].args == (2, 4, 8, 16)
    assert (study.scheduler, study.grace_period, study.metric, study.mode) == ("asha", 1, "val_loss", "min")
    assert (study.fixed["model"], study.fixed["lr_scaling"], study.fixed["momentum"]) == ("tune_cnn", "none", 0.9)
    cfg = study.trial_config({"model_args.l1": 16, "model_args.l2": 256, "lr": 0.01, "batch_size": 4})
    assert cfg.model_args == {"l1": 16, "l2": 256}
    shape = _load_shipped(next(p for p in SHIPPED if p.stem == "cifar10_wrn_shape"), photos)
    assert shape.fixed["model"] == "wrn" and {"model_args.depth", "model_args.widen"} <= set(shape.searched)
    assert shape.trial_config({"model_args.depth": 28, "model_args.widen": 10, "lr": 0.1}).model_args == \
        {"depth": 28, "widen": 10}


def test_model_arguments_are_searched_fixed_and_set_like_any_field_and_checked_against_the_model(tmp_path):
    text = ("fixed: {dataset: digits, model: tune_cnn, num_workers: 1, epochs: 2, model_args: {l2: 16}}\n"
            "searched:\n  model_args.l1: {choice: [8, 32]}\n  lr: {loguniform: [0.1, 1.0]}\n")
    study = load_study(_write(tmp_path, text))
    assert study.trial_config({"model_args.l1": 8, "lr": 0.2}).model_args == {"l1": 8, "l2": 16}
    fixed = load_study(_write(tmp_path, text), overrides={"model_args.l1": 64})  # --set model_args.l1=64
    assert "model_args.l1" not in fixed.searched and fixed.trial_config({"lr": 0.2}).model_args == {"l1": 64, "l2": 16}
    for searched, message in [
        ("model_args.l3: {choice: [8]}", r"searched.model_args.l3: tune_cnn takes l1 \(int, default 120\), l2"),
        ("model_args.l1: {uniform: [4, 64]}", r"model_args.l1 is an integer; use randint, qrandint or choice"),
        ("model_args.l1: {choice: [0, 8]}", r"--model-arg l1=0.* l1 0 must be 1 or more units"),
        ("model_args.l2: {choice: [8]}", r"'model_args.l2' is both fixed and searched"),
    ]:
        bad = text.replace("  model_args.l1: {choice: [8, 32]}", "  " + searched)
        with pytest.raises(ConfigError, match=message):
            load_study(_write(tmp_path, bad))


def test_a_valid_study_converts_to_tune_and_validates_every_trial(tmp_path):
    from ray import tune

    study = load_study(_write(tmp_path, VALID))
    assert (study.num_samples, study.search, study.initial_points, study.seed) == (6, "hyperopt", 2, 3)
    assert (study.scheduler, study.grace_period, study.reduction_factor) == ("asha", 2, 2.0)
    assert study.max_epochs == 6  # ASHA's max_t: the top of the epochs range (inclusive)
    space = tune_space(study)
    assert isinstance(space["lr"], tune.search.sample.Float)
    # Integer ranges and q-grids are a choice of their values (uniform under HyperOpt too), both ends included.
    assert space["epochs"].categories == [3, 4, 5, 6]
    assert space["num_workers"].categories == [1, 2]
    assert space["weight_decay"].categories == [0.0, 0.0001, 0.0002, 0.0003, 0.0004, 0.0005, 0.0006, 0.0007,
                                                0.0008, 0.0009, 0.001]
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
    (("num_samples: 6", "num_samples: 6\nsampels: 3"), "unknown key 'sampels'; known keys: name, description"),
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
    (("model: resnet8", "model: resnet8, verbose: true"), r"fixed.verbose: a study's console is set by console.verbose"),
    (("model: resnet8", "model: resnet8, wandb: true"), r"wandb is a single run's setting; a study logs each trial"),
    (("model: resnet8", "model: resnet8, wandb_id: abc"), r"wandb_id is a single run's setting; a study logs each"),
    (("model: resnet8", "model: vgg"), "unknown model 'vgg'"),
    (("grace_period: 2", "grace_period: 9"), "scheduler.grace_period 9 exceeds the most epochs a trial can run (6)"),
    (("reduction_factor: 2", "reduction_factor: 1"), "scheduler.reduction_factor must be a finite number above 1"),
    (("reduction_factor: 2", "reduction_factor: .inf"), "scheduler.reduction_factor must be a finite number above 1, "
                                                       "got inf"),
    (("seed: 3}", "seed: -1}"), "search.seed must be an integer from 0 to 4294967295 (2^32 - 1), got -1"),
    (("seed: 3}", "seed: 4294967296}"), "search.seed must be an integer from 0 to 4294967295 (2^32 - 1), got 4294967296"),
    (("num_samples: 6", "num_samples: 6\nmode: min"), "mode min contradicts metric val_acc (higher is better); give "
                                                       "mode: max, or leave mode out (it follows the metric)"),
    (("num_samples: 6", "num_samples: 6\nmetric: val_loss\nmode: max"), "mode max contradicts metric val_loss (lower "
                                                                        "is better); give mode: min"),
    (("model: resnet8", "model: resnet8, keep_by: val_loss"), "fixed.keep_by: a study keeps every trial's checkpoints "
                                                             "by its metric (metric: val_acc)"),
    (("  lr: {loguniform", "  keep_by: {choice: [val_acc, val_loss]}\n  lr: {loguniform"),
     "searched.keep_by: a study keeps every trial's checkpoints by its metric"),
    (("  lr: {loguniform: [0.01, 2.0]}", "  lr: {loguniform: [0.01, 2.0]}\n  lr: {loguniform: [0.1, 1.0]}"),
     "key 'lr' is given twice (lines 7 and 8); keep one"),
    (("searched:", "searched: {}\nsearched:"), "key 'searched' is given twice (lines 6 and 7); keep one"),
    # every combination of the extremes, not each bound alone: 1024 x 1 and 32 x 2 fit digits, 1024 x 2 does not
    (("{choice: [32, 64]}", "{choice: [32, 1024]}"), "searched batch_size 1024 with num_workers 2: --batch-size 1024 x "
                                                     "--num-workers 2"),
    (("type: asha", "type: bohb"), "scheduler.type 'bohb' is not one of: asha, fifo, pbt, pb2"),
    (("algorithm: hyperopt", "algorithm: nevergrad"), "search.algorithm 'nevergrad' is not one of: hyperopt, optuna, random"),
    (("seed: 3}", "seed: 3, budget: 2}"), "unknown key search.budget; known: algorithm"),
    (("num_samples: 6", "num_samples: 0"), "num_samples must be a positive integer, got 0"),
    (("num_samples: 6", "num_samples: 6\nmetric: accuracy"), "metric 'accuracy' is not one of: val_acc"),
    (("num_samples: 6", "num_samples: 6\nmode: maximize"), "mode 'maximize' is not one of: max, min"),
    (("num_samples: 6", "num_samples: 6\none_worker_trials: thread"),
     "one_worker_trials 'thread' is not one of: in_process, trainer"),
    (("epochs: 6, weight", "epochs: 6, momentum: 0.9, weight"), "points_to_evaluate[0] must set exactly"),
    (("epochs: 6, weight", "epochs: 6, weight_decay: 0.0001, weight"), "key 'weight_decay' is given twice (line 13); "
                                                                      "keep one"),
    (("{lr: 0.5,", "{lr: -0.5,"), "points_to_evaluate[0].lr = -0.5 cannot be sampled from loguniform(0.01, 2.0): "
                                  "use a number from 0.01 to 2.0"),
    (("{randint: [3, 6]}", "{randint: [3, 5]}"), "points_to_evaluate[0].epochs = 6 cannot be sampled from "
                                                 "randint(3, 5): use an integer from 3 to 5"),
    (("epochs: 6,", "epochs: 4.5,"), "points_to_evaluate[0].epochs = 4.5 cannot be sampled from randint(3, 6): "
                                     "use an integer from 3 to 6"),
    (("batch_size: 32,", "batch_size: 48,"), "points_to_evaluate[0].batch_size = 48 cannot be sampled from "
                                             "choice(32, 64): use one of 32, 64"),
    (("batch_size: 32,", "batch_size: '32',"), "points_to_evaluate[0].batch_size = '32' cannot be sampled"),
    (("weight_decay: 0.0005", "weight_decay: 0.00055"), "points_to_evaluate[0].weight_decay = 0.00055 cannot be "
                                                        "sampled from quniform(0.0, 0.001, 0.0001): use a multiple "
                                                        "of 0.0001 from 0.0 to 0.001"),
    (("weight_decay: 0.0005", "weight_decay: 0.0011"), "points_to_evaluate[0].weight_decay = 0.0011 cannot be"),
    (("num_workers: 2}", "num_workers: 3}"), "points_to_evaluate[0].num_workers = 3 cannot be sampled from "
                                             "qrandint(1, 2, 1): use a multiple of 1 from 1 to 2"),
    (("{qrandint: [1, 2, 1]}", "{qrandint: [10, 100, 32]}"), "searched.num_workers: qrandint samples the multiples "
                                                            "of q = 32, so both bounds must be multiples of it (then "
                                                            "both are sampled); got [10, 100, 32]: e.g. [32, 96, 32]"),
    (("{qrandint: [1, 2, 1]}", "{qrandint: [10, 20, 32]}"), "no two multiples of 32 lie between them"),
    (("0.001, 0.0001]}", "0.00105, 0.0001]}"), "searched.weight_decay: quniform samples the multiples of q = 0.0001"),
    (("{loguniform: [0.01, 2.0]}", "{qloguniform: [0.015, 2.0, 0.01]}"), "e.g. [0.02, 2, 0.01]"),
    (("{randint: [3, 6]}", "{randint: [3, 6000]}"), f"searched.epochs: randint [3, 6000] has more than {MAX_GRID} "
                                                    f"values; use a coarser step"),
    (("0.001, 0.0001]}", "0.001, 0.0000001]}"), "quniform [0.0, 0.001, 1e-07] has more than"),
    (("model: resnet8", "model: resnet8, schedule_epochs: 8"), "schedule_epochs is set by raydist under ASHA (to the "
                                                               "budget, 6 epochs"),
    (("num_samples: 6", "num_samples: 6\nname: a/b"), "name 'a/b' must be a plain folder name"),
    (("num_samples: 6", "num_samples: 6\nname: .hidden"), "name '.hidden' must be a plain folder name"),
    (("num_samples: 6", "num_samples: 6\nname: ''"), "name '' must be a plain folder name"),
    (("num_samples: 6", "num_samples: 6\nname: 42"), "name 42 must be a plain folder name"),
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


def test_an_optuna_study_without_optuna_installed_says_how_to_install_it(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "optuna", None)  # as if not installed: find_spec finds nothing
    path = _write(tmp_path, VALID.replace("algorithm: hyperopt", "algorithm: optuna", 1))
    with pytest.raises(ConfigError, match=r"search.algorithm optuna needs the optuna package: pip install optuna$"):
        load_study(path)


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


def test_numbers_are_read_as_yaml_1_2_writes_them_in_every_part_of_a_study(tmp_path):
    """`1e-3` is a number wherever a study, a config file or --set gives it (PyYAML alone reads it as text:
    a bound `[1e-3, 1e-1]` was refused while `weight_decay: 5e-4` was accepted)."""
    text = VALID.replace("{loguniform: [0.01, 2.0]}", "{loguniform: [1e-3, 2E+0]}").replace(
        "warmup_epochs: 0.5", "warmup_epochs: 0.5, momentum: 9e-1").split("points_to_evaluate")[0]
    study = load_study(_write(tmp_path, text))
    assert study.searched["lr"].args == (0.001, 2.0) and study.fixed["momentum"] == 0.9
    assert load_study(_write(tmp_path, text), {"weight_decay": 5e-4}).fixed["weight_decay"] == 0.0005
    from raydist.config.fields import load_yaml
    from raydist.cli import parse_model_args
    from raydist.tune import _set_value

    assert _set_value("lr", "1e-3") == 0.001 and _set_value("epochs", "12") == 12
    assert parse_model_args(["dropout=3e-1"]) == {"dropout": 0.3}
    (tmp_path / "run.yaml").write_text("lr: 4e-1\nepochs: 1e1\nname: 1e5-run\n")
    assert load_yaml(str(tmp_path / "run.yaml")) == {"lr": 0.4, "epochs": 10, "name": "1e5-run"}


def test_a_key_given_twice_in_a_config_file_is_one_line_naming_it(tmp_path):
    from raydist.config.fields import load_yaml

    (tmp_path / "run.yaml").write_text("lr: 0.4\nepochs: 3\nlr: 0.1\n")
    with pytest.raises(ConfigError) as excinfo:
        load_yaml(str(tmp_path / "run.yaml"))
    assert str(excinfo.value) == f"config file {tmp_path / 'run.yaml'}: key 'lr' is given twice (lines 1 and 3); keep one"
    # YAML's merge key still lets a mapping override what it merges
    (tmp_path / "merge.yaml").write_text("base: &b {lr: 0.4}\nrun: {<<: *b, lr: 0.1}\n")
    from raydist.config.yaml_files import read_yaml_mapping

    assert read_yaml_mapping(str(tmp_path / "merge.yaml"), "file", "keys")["run"] == {"lr": 0.1}


def test_keep_by_given_with_set_is_refused_in_a_study(tmp_path):
    with pytest.raises(ConfigError, match=r"^--set keep_by: a study keeps every trial's checkpoints by its metric"):
        load_study(_write(tmp_path, VALID), {"keep_by": "val_loss"})


def test_every_combination_of_the_searched_extremes_is_checked_and_a_single_bad_bound_named_alone(tmp_path):
    study = load_study(_write(tmp_path, VALID))
    corners = [words for words, _ in study._corners()]
    assert len(corners) == 2 * 2 * 2 * 2 * 2  # five searched fields, two extremes each
    assert corners[0] == "" and corners[1].startswith("searched ") and " reaches " in corners[1]
    assert "searched lr 2.0 with batch_size 64 with epochs 6 with weight_decay 0.001 with num_workers 2: " in corners
    # 2 workers x 1024 at 1 epoch: the search can give it, so the study is refused before Ray starts
    bad = VALID.replace("{choice: [32, 64]}", "{choice: [32, 1024]}").split("points_to_evaluate")[0]
    with pytest.raises(ConfigError, match=r"searched batch_size 1024 with num_workers 2: "):
        load_study(_write(tmp_path, bad))


def test_a_trial_whose_config_the_checks_refuse_is_created_and_fails_alone_in_one_line(tmp_path, monkeypatch):
    """Past MAX_CORNERS combinations (or a check that is not monotone in a range) a sample can still be
    invalid: Tune must be able to create its trial (the resources come from the planned config), and the
    trial fails with the one-line cause, which becomes its row's error while the study goes on."""
    import ray.tune

    from raydist.errors import TrialError
    from raydist.ray_edge.trials import run_trial, trial_resources

    study = load_study(_write(tmp_path, VALID))
    bad = {"lr": 0.5, "batch_size": 4096, "epochs": 6, "weight_decay": 0.0005, "num_workers": 2}
    bundles = trial_resources(study, cluster_has_gpus=False)(bad).bundles  # Tune's trial creation: no error
    assert bundles == [{"memory": 2**20}]  # two workers: a TorchTrainer trial (its workers reserve the CPUs)
    assert study.planned_config(bad).epochs == 6

    class Context:
        def get_trial_dir(self):
            return str(tmp_path / "study" / "trial_abc")

        def get_trial_id(self):
            return "abc"

    monkeypatch.setattr(ray.tune, "get_context", Context)
    with pytest.raises(TrialError) as excinfo:
        run_trial(bad, study, str(tmp_path / "study"))
    cause = str(excinfo.value)
    assert cause == ("ConfigError: --batch-size 4096 x --num-workers 2 = 8192 images per step, but digits has "
                     "1438 training images; at most 719 per worker with 2 workers")


@pytest.mark.parametrize("edit, warning", [
    (("num_samples: 6", "num_samples: 2"), "search.initial_points 2 >= num_samples 2: every trial is a random start-up "
                                           "point and TPE never models a result (a random search)"),
    (("num_samples: 6", "num_samples: 1"), "only the first 1 of the 2 points_to_evaluate run (num_samples 1)"),
])
def test_settings_that_make_part_of_a_study_never_run_are_said_at_its_start(tmp_path, edit, warning):
    text = VALID.replace(*edit).replace("  - {lr: 0.5,", "  - {lr: 0.4, batch_size: 32, epochs: 6, weight_decay: 0.0005, "
                                                     "num_workers: 2}\n  - {lr: 0.5,")
    study = load_study(_write(tmp_path, text))
    assert any(warning in w for w in study.warnings), study.warnings
    unwarned = load_study(_write(tmp_path, VALID)).warnings  # 6 trials, 2 start-up points, 1 point to evaluate
    assert not [w for w in unwarned if "initial_points" in w or "points_to_evaluate" in w], unwarned


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


ELASTIC = """
num_samples: 4
search: {algorithm: random, seed: 0}
scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
fixed: {dataset: digits, model: resnet8, epochs: 3, num_workers: 2-4, batch_size: 32, global_batch: 128}
searched:
  lr: {loguniform: [0.1, 1.0]}
"""


def test_a_study_with_a_worker_range_makes_every_trial_elastic_planned_at_its_maximum(tmp_path):
    study = load_study(_write(tmp_path, ELASTIC))
    cfg = study.trial_config({"lr": 0.5})
    assert cfg.is_elastic() and (cfg.min_workers, cfg.num_workers, cfg.global_batch) == (2, 4, 128)
    assert not study.in_process(cfg)  # a TorchTrainer run: Ray Train resizes it
    fit = dict(total_cpus=8, total_gpus=0, requested=None, where="the cluster")
    assert plan_concurrency(study, free_cpus=8, free_gpus=0, **fit) == 2  # 4 workers each: trials shrink, not queue
    assert plan_concurrency(study, free_cpus=3, free_gpus=0, **{**fit, "total_cpus": 3}) == 1  # 2 fit: it starts
    with pytest.raises(ConfigError, match="one trial needs 2 CPUs and 0 GPUs .* but the cluster has 1 CPUs"):
        plan_concurrency(study, free_cpus=1, free_gpus=0, **{**fit, "total_cpus": 1})
    # --set: another range, or one number (a fixed group again)
    assert load_study(_write(tmp_path, ELASTIC), {"num_workers": "1-3"}).trial_config({"lr": 0.5}).min_workers == 1
    fixed = load_study(_write(tmp_path, ELASTIC.replace(", global_batch: 128", "")), {"num_workers": "3"})
    assert not fixed.trial_config({"lr": 0.5}).is_elastic()
    # A range is given once, not searched; a bad one is named.
    searched = ELASTIC.replace(", num_workers: 2-4", "").replace(", global_batch: 128", "") + \
        "  num_workers: {choice: [1, 2-4]}\n"
    with pytest.raises(ConfigError, match=r"num_workers '2-4': a worker range \(an elastic run\) is given once"):
        load_study(_write(tmp_path, searched, "s.yaml"))
    with pytest.raises(ConfigError, match=r"fixed.num_workers '4-2': give a number of workers, or a range MIN-MAX"):
        load_study(_write(tmp_path, ELASTIC.replace("2-4", "4-2"), "b.yaml"))


def test_an_elastic_trials_mid_epoch_checkpoints_do_not_reach_tune_and_its_epochs_do():
    """A spot notice's checkpoint is a Train report (Ray Train restarts from it) but not a Tune result:
    ASHA counts results as epochs."""
    from raydist.ray_edge.trials import epochs_to_tune

    import ray.tune.integration.ray_train as ray_train_tune

    class Queue:
        def __init__(self):
            self.items = []

        def put(self, item):
            self.items.append(item)

    queue = Queue()
    with pytest.MonkeyPatch.context() as patch:  # outside a Tune session: give the callback its queue
        patch.setattr(ray_train_tune, "_in_tune_session", lambda: True)
        patch.setattr(ray_train_tune, "get_session",
                      lambda: type("S", (), {"_get_or_create_inter_actor_queue": lambda self: queue})())
        callback = epochs_to_tune()
    callback.after_report(None, [{"epoch": 3, "partial_epoch": True, "position": 384}], None)
    callback.after_report(None, [{"epoch": 3, "val_acc": 0.9}], None)
    assert queue.items == [{"epoch": 3, "val_acc": 0.9}]


def _tune(*args, capsys, monkeypatch, cwd):
    """`python -m raydist.tune ARGS` in this process (tests/cli.py): exit code, stdout, stderr."""
    monkeypatch.chdir(cwd)
    return run_main("raydist.tune", list(args), capsys, monkeypatch)


@pytest.mark.parametrize("args, message", [
    (["--search-space", "nope"], "--search-space nope: no such file; shipped studies: cifar100_resnet50"),
    (["--num-samples", "0"], "--num-samples must be a positive integer, got 0"),
    (["--set", "epochs"], "--set 'epochs' must look like KEY=VALUE"),
    (["--set", "epochs=-1"], "--epochs must be positive, got -1"),
    (["--set", "lr=fast"], "--set lr: lr = 'fast' is not a valid float"),
    (["--search", "grid"], "argument --search: invalid choice: 'grid'"),
    (["--resume", "not-an-experiment"], "not a raydist.tune experiment folder"),
    (["--search-space", "cifar10_wrn", "--set", "data_dir=nodata"], "not found in"),
    (["--set", "num_workers=20", "--set", "batch_size=32"], "one trial needs 20 CPUs"),
    (["--name", ""], "--name '' must be a plain folder name"),
    (["--name", " "], "--name ' ' must be a plain folder name"),
    (["--search-space", "cifar10_resnet18", "--set", "epochs=1"],
     "cifar10_resnet18.yaml: searched warmup_epochs reaches 2.0: --warmup-epochs 2.0 exceeds --epochs 1"),
    (["--wandb-project", "foo"], "--wandb-project foo without --wandb: nothing would be logged to W&B"),
])
def test_tune_cli_bad_input_exits_2_in_one_line_before_ray(tmp_path, capsys, monkeypatch, args, message):
    code, out, err = _tune(*args, "--storage-path", str(tmp_path / "runs"), capsys=capsys, monkeypatch=monkeypatch,
                           cwd=tmp_path)
    assert code == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raydist.tune: error: ") and message in lines[0], err
    assert not (tmp_path / "runs").exists()  # nothing written
    assert "Ray" not in out and "dashboard" not in out  # no cluster started (run_main refuses to start one)


def test_the_tune_process_exits_2_in_one_line_before_importing_ray(tmp_path):
    """The real process, once: exit code 2, the one line on stderr, and Ray never imported (its import alone
    takes seconds, and a bad flag must not wait for it)."""
    probe = ("import runpy, sys; sys.argv = ['raydist.tune', '--num-samples', '0', '--storage-path', 'runs']\n"
             "try:\n    runpy.run_module('raydist.tune', run_name='__main__')\n"
             "finally:\n    print('ray imported' if 'ray' in sys.modules else 'ray not imported')")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "raydist.tune: error: --num-samples must be a positive integer, got 0"
    assert result.stdout.strip() == "ray not imported" and not (tmp_path / "runs").exists()


def test_a_study_changed_on_the_command_line_gets_the_checks_of_its_file(tmp_path, capsys, monkeypatch):
    """--scheduler/--search/--num-samples join the study before it is checked: a FIFO study whose grace
    period is longer than its trials is fine, the same study under --scheduler asha is not."""
    study = tmp_path / "s.yaml"
    study.write_text("scheduler: {type: fifo, grace_period: 5}\nfixed: {epochs: 3}\nsearched: {lr: {loguniform: [0.1, 1.0]}}\n")
    from raydist.tune import parse_args

    assert parse_args(["--search-space", str(study), "--storage-path", str(tmp_path / "runs")]).study.scheduler == "fifo"
    code, _, err = _tune("--search-space", str(study), "--scheduler", "asha", "--storage-path", str(tmp_path / "runs"),
                         capsys=capsys, monkeypatch=monkeypatch, cwd=tmp_path)
    assert code == 2
    assert err.strip() == (f"raydist.tune: error: {study}: scheduler.grace_period 5 exceeds the most "
                           f"epochs a trial can run (3)")
    plan = parse_args(["--search-space", str(study), "--scheduler", "asha", "--set", "epochs=6", "--search", "random",
                       "--num-samples", "2", "--storage-path", str(tmp_path / "runs")])
    assert (plan.study.scheduler, plan.study.search, plan.study.num_samples) == ("asha", "random", 2)


def test_set_keeps_a_text_field_as_typed(tmp_path):
    """YAML would read `~` as empty and 2024-01-01 as a date; --set on a text field keeps the text."""
    from raydist.tune import parse_args

    plan = parse_args(["--set", "data_dir=~", "--set", "model=resnet8", "--storage-path", str(tmp_path / "runs")])
    assert plan.study.fixed["data_dir"] == os.path.expanduser("~")
    plan = parse_args(["--set", "epochs=4", "--set", "lr=1e-1", "--storage-path", str(tmp_path / "runs")])
    assert (plan.study.fixed["epochs"], plan.study.fixed["lr"]) == (4, 0.1)


def test_a_storage_path_that_cannot_be_written_is_refused_before_ray(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = _tune("--storage-path", str(blocker / "runs"), capsys=capsys, monkeypatch=monkeypatch, cwd=tmp_path)
    assert code == 2
    assert err.strip() == (f"raydist.tune: error: --storage-path {blocker / 'runs'}: {blocker} is a file, "
                           f"not a folder; give a folder path")


def test_tune_list_names_every_shipped_study(tmp_path, capsys, monkeypatch):
    code, out, _ = _tune("--list", capsys=capsys, monkeypatch=monkeypatch, cwd=tmp_path)
    assert code == 0
    for path in SHIPPED:
        assert path.stem in out


@pytest.mark.parametrize("args, message", [
    (["--set", "lr=0.1"], "--resume: "),  # the wording belongs to raydist.tune's resume checks
    (["--num-samples", "9"], "--resume continues the study as it was; drop --num-samples"),
])
def test_resume_keeps_the_study_as_it_was(tmp_path, capsys, monkeypatch, args, message):
    experiment = tmp_path / "experiment"
    experiment.mkdir()
    (experiment / "study.yaml").write_text(VALID)
    code, _, err = _tune("--resume", str(experiment), *args, capsys=capsys, monkeypatch=monkeypatch, cwd=tmp_path)
    line = err.strip()
    assert code == 2 and line.startswith(f"raydist.tune: error: {message}") and "\n" not in line, line
    assert sorted(p.name for p in experiment.iterdir()) == ["study.yaml"]


# ---- what the searchers really sample -------------------------------------------------------------------

# Every grid kind at once; `lr` qloguniform with a coarse grid so that both of its end cells are likely.
SAMPLED = """
scheduler: {type: fifo}
fixed: {dataset: digits, model: resnet8, warmup_epochs: 0.5}
searched:
  epochs: {randint: [4, 10]}
  batch_size: {qrandint: [32, 256, 32]}
  num_workers: {qrandint: [1, 2, 1]}
  weight_decay: {quniform: [0.0, 0.001, 0.0001]}
  lr: {qloguniform: [0.1, 1.0, 0.1]}
  optimizer: {choice: [sgd, adamw]}
"""
DRAWS = 2000


def _hyperopt_samples(study, n, seed=0):
    """n proposals of Ray's HyperOptSearch in its random start-up phase, as Tune would ask for them."""
    from ray.tune.search.hyperopt import HyperOptSearch

    searcher = HyperOptSearch(n_initial_points=n + 1, random_state_seed=seed)
    searcher.set_search_properties("val_acc", "max", tune_space(study))
    return [searcher.suggest(f"t{i}") for i in range(n)]


def _random_samples(study, n, seed=0):
    """n trials' configs from Ray's BasicVariantGenerator (algorithm: random)."""
    from ray.tune.search import BasicVariantGenerator

    generator = BasicVariantGenerator(random_state=seed)
    generator.add_configurations({"study": {"run": lambda config: None, "config": tune_space(study),
                                            "num_samples": n}})
    configs = []
    while (trial := generator.next_trial()) is not None:
        configs.append({k: trial.config[k] for k in study.searched})
    return configs


def _log_cells(low, high, q):
    """qloguniform: the chance of each multiple k x q, a log-uniform value in [low, high] rounded to q."""
    cells = {k: (max(low, (k - 0.5) * q), min(high, (k + 0.5) * q)) for k in range(round(low / q), round(high / q) + 1)}
    return {k: math.log(b / a) / math.log(high / low) for k, (a, b) in cells.items()}


# What SAMPLED means, written out independently of raydist: field -> (q, {k: chance of the value k x q}).
MEANING = {
    "epochs": (1, {k: 1 / 7 for k in range(4, 11)}),
    "batch_size": (32, {k: 1 / 8 for k in range(1, 9)}),
    "num_workers": (1, {1: 1 / 2, 2: 1 / 2}),
    "weight_decay": (0.0001, {k: 1 / 11 for k in range(0, 11)}),
    "lr": (0.1, _log_cells(0.1, 1.0, 0.1)),
}


def _grid_index(value, q, name):
    """k such that value = k x q (up to float rounding noise), else the test fails."""
    k = round(value / q)
    assert abs(value / q - k) < 1e-9 and k in MEANING[name][1], (name, value)
    return k


def _assert_sampled_as_the_file_says(samples):
    n = len(samples)
    observed = {name: Counter(_grid_index(s[name], q, name) for s in samples) for name, (q, _) in MEANING.items()}
    observed["optimizer"] = Counter(s["optimizer"] for s in samples)
    expected = {name: chances for name, (_, chances) in MEANING.items()}
    expected["optimizer"] = {"sgd": 1 / 2, "adamw": 1 / 2}
    for name, chances in expected.items():
        assert set(observed[name]) == set(chances), (name, sorted(set(chances) - set(observed[name])))  # ends too
        for value, p in chances.items():  # 5 sigma per value, and a fixed seed: cannot flake
            sigma = math.sqrt(n * p * (1 - p))
            assert abs(observed[name][value] - n * p) <= 5 * sigma, (name, value, observed[name][value], n * p)


@pytest.mark.parametrize("searcher", [_hyperopt_samples, _random_samples], ids=["hyperopt", "random"])
def test_both_searchers_sample_every_distribution_as_the_file_says(tmp_path, searcher):
    import ray

    connected_before = ray.is_initialized()  # earlier tests in this process may have joined the session cluster
    study = load_study(_write(tmp_path, SAMPLED))
    samples = searcher(study, DRAWS)
    assert len(samples) == DRAWS
    _assert_sampled_as_the_file_says(samples)
    for sample in samples[:100]:  # the sample is the config value, qloguniform's float noise removed
        cfg = study.trial_config(sample)
        assert 0.1 <= cfg.lr <= 1.0 and cfg.lr == float(f"{cfg.lr:.12g}")
        assert (cfg.epochs, cfg.batch_size, cfg.weight_decay) == (sample["epochs"], sample["batch_size"],
                                                                  sample["weight_decay"])
    assert ray.is_initialized() == connected_before  # in-process: sampling starts or joins no cluster


def test_hyperopt_keeps_to_the_bounds_once_tpe_models_the_results(tmp_path):
    """After its random start-up, TPE proposes from its own model of the results: still in bounds, on the grid."""
    from ray.tune.search.hyperopt import HyperOptSearch

    study = load_study(_write(tmp_path, SAMPLED))
    searcher = HyperOptSearch(n_initial_points=5, random_state_seed=1)
    searcher.set_search_properties("val_acc", "max", tune_space(study))
    proposals = []
    for i in range(60):
        sample = searcher.suggest(f"t{i}")
        proposals.append(sample)
        # a made-up result that rewards the ends, so TPE is drawn toward them
        searcher.on_trial_complete(f"t{i}", {"val_acc": sample["epochs"] / 10 + sample["batch_size"] / 256})
    for name, (q, _) in MEANING.items():
        for proposal in proposals:
            _grid_index(proposal[name], q, name)
    tpe = proposals[5:]
    assert max(p["epochs"] for p in tpe) == 10 and max(p["batch_size"] for p in tpe) == 256


def test_points_to_evaluate_reach_both_searchers_exactly_as_written(tmp_path):
    """HyperOpt looks a point's value up among the choice's values by equality: grid values must match exactly
    (0.0005, not 5 x 0.0001 = 0.0005000000000000001)."""
    from ray.tune.search import BasicVariantGenerator
    from ray.tune.search.hyperopt import HyperOptSearch

    point = {"epochs": 10, "batch_size": 224, "num_workers": 1, "weight_decay": 0.0007, "lr": 0.3,
             "optimizer": "adamw"}
    study = load_study(_write(tmp_path, SAMPLED + f"points_to_evaluate: [{point}]\n".replace("'", "")))
    assert study.points_to_evaluate == [point]
    searcher = HyperOptSearch(points_to_evaluate=study.points_to_evaluate, n_initial_points=2, random_state_seed=0)
    searcher.set_search_properties("val_acc", "max", tune_space(study))
    assert searcher.suggest("t0") == point
    generator = BasicVariantGenerator(points_to_evaluate=study.points_to_evaluate, random_state=0)
    generator.add_configurations({"study": {"run": lambda config: None, "config": tune_space(study),
                                            "num_samples": 1}})
    trial = generator.next_trial()
    assert {k: trial.config[k] for k in point} == point


# ---- fair ASHA rungs ----------------------------------------------------------------------------------


def test_under_asha_every_schedule_spans_the_budget_and_under_fifo_its_own_epochs(tmp_path):
    study = load_study(_write(tmp_path, VALID))  # asha, epochs randint [3, 6]
    sample = {"lr": 0.5, "batch_size": 32, "epochs": 3, "weight_decay": 0.0, "num_workers": 1}
    cfg = study.trial_config(sample)
    assert (cfg.epochs, cfg.schedule_epochs) == (3, 6) == (3, study.max_epochs)
    assert {c.schedule_epochs for c in study._corner_configs()} == {6}
    study.scheduler = "fifo"  # as `raydist.tune --scheduler fifo` sets it after loading
    assert study.trial_config(sample).schedule_epochs is None
    assert {c.schedule_epochs for c in study._corner_configs()} == {None}

    fifo = load_study(_write(tmp_path, VALID.replace("type: asha", "type: fifo"), "fifo.yaml"))
    assert fifo.trial_config(sample).schedule_epochs is None
    own = load_study(_write(tmp_path, VALID.replace("type: asha", "type: fifo").replace(
        "warmup_epochs: 0.5", "warmup_epochs: 0.5, schedule_epochs: 9"), "own.yaml"))
    assert own.trial_config(sample).schedule_epochs == 9  # FIFO keeps what the file says


@pytest.mark.parametrize("scheduler, epochs_searched, warned", [
    ("asha", True, True), ("asha", False, False), ("fifo", True, False), ("fifo", False, False)])
def test_a_warning_exactly_when_epochs_is_searched_under_asha(tmp_path, scheduler, epochs_searched, warned):
    text = VALID.replace("type: asha", f"type: {scheduler}").split("points_to_evaluate")[0]
    study = load_study(_write(tmp_path, text), None if epochs_searched else {"epochs": 6})
    if not warned:
        assert study.warnings == []
        return
    (warning,) = study.warnings
    assert "\n" not in warning
    assert "epochs is searched under ASHA" in warning and "budget (6 epochs)" in warning
    assert "fix epochs at the budget (fixed: {epochs: 6}) and let ASHA decide how long each trial runs" in warning
    study.scheduler = "fifo"  # follows --scheduler
    assert study.warnings == []


def test_the_name_key_names_the_study(tmp_path):
    assert load_study(_write(tmp_path, VALID, "my_file.yaml")).name == "my_file"
    named = load_study(_write(tmp_path, "name: digits_quick\n" + VALID, "study.yaml"))
    assert named.name == "digits_quick"  # a study saved as <experiment>/study.yaml keeps its name
    assert "digits_quick" in " ".join(named.warnings)


def test_shipped_asha_studies_let_asha_decide_how_long_a_trial_runs(photos):
    for path in SHIPPED:
        study = _load_shipped(path, photos)
        assert study.warnings == [], path
        if study.scheduler == "asha":
            assert "epochs" not in study.searched and study.fixed["epochs"] == study.max_epochs, path
            low = {k: d.extremes()[0] for k, d in study.searched.items()}
            assert study.trial_config(low).schedule_epochs == study.max_epochs


@pytest.mark.parametrize("searcher", [_hyperopt_samples, _random_samples], ids=["hyperopt", "random"])
def test_both_searchers_sample_a_models_arguments(tmp_path, searcher):
    text = ("fixed: {dataset: digits, model: wrn, num_workers: 1, epochs: 2}\n"
            "searched:\n  model_args.depth: {choice: [10, 16]}\n  model_args.widen: {randint: [1, 4]}\n"
            "  lr: {loguniform: [0.1, 1.0]}\n")
    study = load_study(_write(tmp_path, text))
    samples = searcher(study, 40)
    assert {s["model_args.depth"] for s in samples} == {10, 16}
    assert {s["model_args.widen"] for s in samples} == {1, 2, 3, 4}
    cfg = study.trial_config(samples[0])
    assert cfg.model_args == {"depth": samples[0]["model_args.depth"], "widen": samples[0]["model_args.widen"]}


# ---- conditional fields (when) ---------------------------------------------------------------------------

CONDITIONAL = """
search: {algorithm: optuna, initial_points: 2, seed: 0}
fixed: {dataset: digits, model: resnet8, epochs: 4, use_gpu: false}
searched:
  micro_batches: {choice: [2, 4], when: {model_parallel: 2}}
  model_parallel: {choice: [1, 2]}
  lr: {loguniform: [0.01, 1.0]}
"""


def test_a_conditional_field_applies_only_under_its_choice_and_its_corners_are_checked_there(tmp_path):
    # micro_batches > 1 is refused with model_parallel 1: searched without `when`, the corners would refuse
    # the study; with it, only the combinations that can happen are checked.
    with pytest.raises(ConfigError, match=r"--micro-batches 2 .*model-parallel"):
        load_study(_write(tmp_path, CONDITIONAL.replace(", when: {model_parallel: 2}", ""), "flat.yaml"))
    study = load_study(_write(tmp_path, CONDITIONAL))
    assert list(study.searched) == ["model_parallel", "micro_batches", "lr"]  # the condition first
    assert study.searched["micro_batches"].describe() == "choice(2, 4) when model_parallel in 2"
    assert study.applying({"model_parallel": 1, "micro_batches": 4, "lr": 0.1}) == {"model_parallel": 1, "lr": 0.1}
    assert study.trial_config({"model_parallel": 1, "micro_batches": 4, "lr": 0.1}).micro_batches == 1
    assert study.trial_config({"model_parallel": 2, "micro_batches": 4, "lr": 0.1}).micro_batches == 4
    corners = [cfg for _, cfg in study._corners()]
    assert {(c.model_parallel, c.micro_batches) for c in corners} == {(1, 1), (2, 2), (2, 4)}


def test_a_condition_on_a_field_fixed_by_set_is_decided_before_the_study(tmp_path):
    path = _write(tmp_path, CONDITIONAL)
    assert "micro_batches" not in load_study(path, overrides={"model_parallel": 1}).searched
    kept = load_study(path, overrides={"model_parallel": 2}).searched["micro_batches"]
    assert kept.when == () and kept.args == (2, 4)


@pytest.mark.parametrize("edit, message", [
    (("when: {model_parallel: 2}", "when: {model_paralel: 2}"), "searched.micro_batches.when.model_paralel: "
                                                                "model_paralel is not a config field"),
    (("when: {model_parallel: 2}", "when: {lr: 0.1}"), "searched.micro_batches.when.lr: a condition names a "
                                                       "searched choice, and lr is searched as loguniform"),
    (("when: {model_parallel: 2}", "when: {model_parallel: 3}"), "searched.micro_batches.when.model_parallel: 3 is "
                                                                 "not one of model_parallel's choices (1, 2)"),
    (("when: {model_parallel: 2}", "when: {micro_batches: 2}"), "a field cannot depend on itself"),
    (("when: {model_parallel: 2}", "when: {model_parallel: []}"), "lists no value"),
    (("when: {model_parallel: 2}", "when: model_parallel"), "when must name one searched choice and its values"),
    (("model_parallel: {choice: [1, 2]}", "model_parallel: {choice: [1, 2], when: {micro_batches: 2}}"),
     "searched micro_batches, model_parallel depend on each other in a circle"),
    (("algorithm: optuna", "algorithm: hyperopt"), "searched.micro_batches has a condition (when), which "
                                                   "search.algorithm optuna samples only where it applies"),
])
def test_a_bad_condition_is_one_line_naming_the_file_and_the_field(tmp_path, edit, message):
    old, new = edit
    assert old in CONDITIONAL
    path = _write(tmp_path, CONDITIONAL.replace(old, new, 1))
    with pytest.raises(ConfigError) as caught:
        load_study(path)
    assert "\n" not in str(caught.value) and message in str(caught.value) and path in str(caught.value)


def test_points_to_evaluate_set_exactly_the_fields_that_apply_to_them(tmp_path):
    good = CONDITIONAL + ("points_to_evaluate:\n  - {model_parallel: 1, lr: 0.1}\n"
                          "  - {model_parallel: 2, micro_batches: 4, lr: 0.1}\n")
    assert load_study(_write(tmp_path, good)).points_to_evaluate[1] == {"model_parallel": 2, "micro_batches": 4,
                                                                          "lr": 0.1}
    for point, missing in (("{model_parallel: 1, micro_batches: 2, lr: 0.1}", "model_parallel, lr"),
                           ("{model_parallel: 2, lr: 0.1}", "model_parallel, micro_batches, lr")):
        path = _write(tmp_path, CONDITIONAL + f"points_to_evaluate:\n  - {point}\n", "bad.yaml")
        with pytest.raises(ConfigError, match=rf"points_to_evaluate\[0\] must set exactly the searched fields that "
                                              rf"apply to it: {missing}$"):
            load_study(path)


def test_a_choice_of_null_is_a_value_not_a_missing_field(tmp_path):
    text = ("search: {algorithm: random}\nfixed: {dataset: digits, epochs: 3}\nsearched:\n"
            "  target_accuracy: {choice: [null, 0.9]}\n  lr: {loguniform: [0.01, 1.0]}\n"
            "points_to_evaluate: [{target_accuracy: null, lr: 0.1}]\n")
    study = load_study(_write(tmp_path, text))
    assert study.points_to_evaluate == [{"target_accuracy": None, "lr": 0.1}]
    assert study.applying({"target_accuracy": None, "lr": 0.1}) == {"target_accuracy": None, "lr": 0.1}


def test_a_chain_whose_first_condition_never_holds_leaves_both_out_whatever_the_files_order(tmp_path):
    chained = CONDITIONAL.replace("model_parallel: {choice: [1, 2]}",
                                 "model_parallel: {choice: [1, 2], when: {optimizer: [adamw]}}")  # sgd: the default
    study = load_study(_write(tmp_path, chained))
    assert list(study.searched) == ["lr"]


def test_a_model_argument_cannot_be_a_condition(tmp_path):
    text = ("search: {algorithm: optuna}\nfixed: {dataset: digits, model: tune_cnn, epochs: 3}\nsearched:\n"
            "  model_args.l1: {choice: [32, 64]}\n  model_args.l2: {choice: [8, 16], when: {model_args.l1: [64]}}\n")
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=r"searched.model_args.l2.when.model_args.l1: a condition names a searched "
                                          r"choice of the config, not a model argument$"):
        load_study(path)
