"""The typed config: validation of every bad input, YAML layering, and the CLI's exit code 2 before Ray."""

import os
import subprocess
import sys

import pytest
from cli import without_ray_lines

from raydist.errors import ConfigError
from raydist.config.fields import TrainConfig
from raydist.config.fields import load_yaml
from raydist.cli import parse_cli
from raydist.preflight import validate


@pytest.mark.parametrize("overrides, message", [
    ({"lr": 0.0}, r"--lr must be positive, got 0.0"),
    ({"lr": -1.0}, r"--lr must be positive, got -1.0"),
    ({"lr": float("nan")}, r"--lr must be positive"),
    ({"batch_size": 0}, r"--batch-size must be positive, got 0"),
    ({"epochs": -2}, r"--epochs must be positive, got -2"),
    ({"grad_accum": 0}, r"--grad-accum must be positive"),
    ({"num_workers": 0}, r"--num-workers must be positive"),
    ({"model": "resnet9000"}, r"unknown model 'resnet9000'; known: resnet18, .*resnet8.*wrn_dli"),
    ({"dataset": "imagenet22k"}, r"unknown dataset 'imagenet22k'; known: cifar10, cifar100, digits, fake, fashion_mnist"),
    ({"target_accuracy": 0.0}, r"--target-accuracy must be in \(0, 1\], got 0.0"),
    ({"target_accuracy": 1.5}, r"--target-accuracy must be in \(0, 1\], got 1.5"),
    ({"label_smoothing": 1.0}, r"--label-smoothing must be in \[0, 1\)"),
    ({"ema": 1.0}, r"--ema must be a decay in \[0, 1\) \(0: no average\), got 1.0"),
    ({"ema": -0.5}, r"--ema must be a decay in \[0, 1\)"),
    ({"val_fraction": 1.0}, r"--val-fraction must be in \(0, 1\)"),
    ({"optimizer": "lamb"}, r"--optimizer 'lamb' is not one of: sgd, adamw"),
    ({"warmup_epochs": 20.0, "epochs": 5}, r"--warmup-epochs 20.0 exceeds --epochs 5"),
    ({"pretrained": True, "model": "resnet8"}, r"model 'resnet8' has no published weights; models with them: resnet18_imagenet, resnet50_imagenet"),
    ({"name": "a/b"}, r"--name 'a/b' must be a plain folder name"),
    ({"weight_decay": -0.1}, r"--weight-decay must be zero or more"),
    ({"precise_bn": -1}, r"--precise-bn must be zero or more, got -1"),
    ({"clip_grad_norm": -1.0}, r"--clip-grad-norm must be zero or more, got -1.0"),
    ({"mixup": -0.2}, r"--mixup must be zero or more, got -0.2"),
    ({"cutmix": float("nan")}, r"--cutmix must be zero or more, got nan"),
    ({"mixup": 0.2, "mix_prob": 0.0}, r"--mix-prob must be a share of the training images in \(0, 1\], got 0.0"),
    ({"random_erase": 1.5}, r"--random-erase must be a share of the training images in \[0, 1\], got 1.5"),
    ({"augment": "randaugment", "tta": True}, r"--tta averages each image with its mirror, which a model trained "
     r"under --augment randaugment \(crop on digits\) never sees; train with an augmentation that mirrors"),
    ({"name": " "}, r"--name ' ' must be a plain folder name"),
    ({"name": "run "}, r"--name 'run ' must be a plain folder name"),
    ({"name": ""}, r"--name '' must be a plain folder name"),
    ({"address": "ray://head:10001"}, r"--address ray://head:10001: Ray Client addresses are not supported"),
    ({"address": "head:99999"}, r"--address 'head:99999' is not a cluster address; expected 'auto' or the head node's host:port with a port in 1-65535"),
    ({"val_fraction": 0.0001}, r"--val-fraction 0.0001 leaves no validation image of digits; give a larger share"),
    ({"val_fraction": 0.00001, "dataset": "cifar10", "classes": "0-1"},
     r"--val-fraction 1e-05 leaves no validation image of cifar10 in --classes 0-1"),
    ({"fake_num_classes": 1}, r"--fake-num-classes must be at least 2"),
    ({"fake_image_size": 4}, r"--fake-image-size 4 must be between 8 and 1024 pixels"),
    ({"lr_step_gamma": 0.0}, r"--lr-step-gamma must be in \(0, 1\]"),
    ({"lr_step_gamma": 1.5}, r"--lr-step-gamma must be in \(0, 1\]"),
])
def test_bad_values_are_rejected_with_the_value_and_what_is_accepted(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(TrainConfig(**overrides))


def test_defaults_are_valid_and_train_digits_with_resnet8():
    cfg = validate(TrainConfig())
    assert (cfg.dataset, cfg.model) == ("digits", "resnet8")


def test_yaml_sets_defaults_and_flags_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 7\nlr: 0.2\nmodel: wrn16_4\n")
    cfg, explicit, config_file = parse_cli(["--config", str(path), "--lr", "0.05"])
    assert (cfg.epochs, cfg.lr, cfg.model) == (7, 0.05, "wrn16_4")
    assert explicit == {"lr": 0.05} and config_file == [str(path)]


def test_model_args_come_from_yaml_and_flags_argument_by_argument_typed_by_the_models_builder(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("model: wrn\nmodel_args: {depth: 28, widen: 4, dropout: 0}\n")
    cfg, _, _ = parse_cli(["--config", str(path), "--model-arg", "widen=10"])
    assert cfg.model_args == {"depth": 28, "widen": 10, "dropout": 0.0}  # the flag's widen, the file's depth
    assert isinstance(cfg.model_args["dropout"], float)  # YAML's 0 read as the builder's float
    assert parse_cli(["--model", "tune_cnn"])[0].model_args == {}  # the builder's defaults
    with pytest.raises(ConfigError, match=r"model_args = \[1, 2\] must be a mapping of argument names"):
        TrainConfig.from_dict({"model_args": [1, 2]})


def test_yaml_values_are_coerced_to_field_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1\nuse_gpu: 'no'\nweight_decay: '1e-4'\n")
    values = load_yaml(str(path))
    assert values == {"lr": 1.0, "use_gpu": False, "weight_decay": 1e-4}
    assert isinstance(values["lr"], float)


@pytest.mark.parametrize("text, message", [
    ("epochz: 3\n", r"c.yaml: unknown key 'epochz'; known keys: dataset, "),
    ("epochs: three\n", r"c.yaml: epochs = 'three' is not a valid int"),
    ("epochs: 2.5\n", r"c.yaml: epochs = 2.5 is not a valid int"),
    ("epochs: [1, 2\n", r"config file .*c.yaml is not valid YAML \(line 2\)"),
    ("- 1\n- 2\n", r"must hold a mapping of config keys, got list"),
])
def test_bad_yaml_files_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_yaml(str(path))


def test_yamls_own_types_are_read_as_meant(tmp_path):
    """PyYAML reads 1e3 as text and 2024-01-01 as a date: what is unambiguous is taken as meant."""
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 1e3\nname: 2024-01-01\nlr: 1e-1\n")
    assert load_yaml(str(path)) == {"epochs": 1000, "name": "2024-01-01", "lr": 0.1}
    path.write_text("data_dir: ~\n")
    with pytest.raises(ConfigError, match=r"c.yaml: data_dir cannot be empty .*quote a path, e.g. '~/data'"):
        load_yaml(str(path))


def test_a_worker_range_and_min_workers_together_are_refused_where_they_are_given(tmp_path):
    """`--num-workers 2-8 --min-workers 3` trained on at least 2 (the range won, silently); in a file too."""
    path = tmp_path / "run.yaml"
    path.write_text("num_workers: 2-8\nmin_workers: 3\n")
    with pytest.raises(ConfigError) as excinfo:
        parse_cli(["--config", str(path)])
    assert str(excinfo.value) == (f"{path}: num_workers '2-8' with min_workers 3: the range already sets the fewest "
                                  f"workers (2); give the range alone")
    path.write_text("num_workers: 2-8\n")  # a file's range, a plain --num-workers over it: a fixed group
    assert parse_cli(["--config", str(path), "--num-workers", "4"])[0].min_workers is None
    assert (parse_cli(["--config", str(path)])[0].min_workers, parse_cli(["--config", str(path)])[0].num_workers) == (2, 8)


def test_config_files_merge_in_order_and_a_bad_value_names_its_file_and_key(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("epochs: 7\nlr: 0.2\n")
    second.write_text("lr: 0.05\nmodel: wrn16_4\n")
    cfg, explicit, config_files = parse_cli(["--config", str(first), "--config", str(second), "--batch-size", "32"])
    assert (cfg.epochs, cfg.lr, cfg.model, cfg.batch_size) == (7, 0.05, "wrn16_4", 32)
    assert config_files == [str(first), str(second)]
    second.write_text("lr: -1\n")
    with pytest.raises(ConfigError) as error:
        parse_cli(["--config", str(first), "--config", str(second)])
    assert str(error.value) == f"{second}: lr must be positive, got -1.0"
    with pytest.raises(ConfigError, match=r"^--lr must be positive, got -2.0$"):  # typed on the command line
        parse_cli(["--config", str(second), "--lr", "-2"])


def test_unreadable_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read config file .*missing.yaml"):
        load_yaml(str(tmp_path / "missing.yaml"))


def _cli(*args, cwd):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "raydist.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def _main(*args, capsys):
    """The CLI in this process (fast); the subprocess tests below prove the real exit code."""
    from raydist.train import main

    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse errors
        code = exc.code
    return code, without_ray_lines(capsys.readouterr().err)


@pytest.mark.parametrize("args, message", [
    (["--lr", "-0.1"], "--lr must be positive, got -0.1"),
    (["--epochs", "0"], "--epochs must be positive, got 0"),
    (["--batch-size", "ten"], "argument --batch-size: 'ten' is not a valid int"),
    (["--model", "vgg"], "unknown model 'vgg'; known:"),
    (["--model", "timm:resnt18"], "unknown timm model 'resnt18' (--model timm:resnt18); close: timm:resnet18"),
    (["--dataset", "mnist"], "unknown dataset 'mnist'; known:"),
    (["--target-accuracy", "95"], "--target-accuracy must be in (0, 1], got 95.0"),
    (["--use-gpu", "--num-workers", "2"], "asks for 2 GPUs but this machine has 0"),
    (["--num-workers", "64", "--batch-size", "8"], "asks for 64 CPUs but this machine has"),
    (["--num-workers", "2", "--batch-size", "720"],
     r"--batch-size 720 x --num-workers 2 = 1440 images per step, but digits has 1438 training images; "
     r"at most 719 per worker"),
    (["--dataset", "fake", "--fake-train-size", "3", "--num-workers", "4", "--batch-size", "1"],
     "but fake has 3 training images"),
    (["--epochs", "5", "--schedule-epochs", "4"], "--schedule-epochs 4 is below --epochs 5"),
    (["--momentum", "1.0"], "--momentum must be in [0, 1) (SGD momentum; AdamW's beta1), got 1.0"),
    (["--sync-batchnorm", "--num-workers", "2"],
     "--sync-batchnorm needs GPU workers (PyTorch's SyncBatchNorm runs on CUDA only) but these 2 workers train "
     "on CPUs; drop --sync-batchnorm or add --use-gpu"),
    (["--use-gpu", "--gpus-per-worker", "0.5"],
     "--gpus-per-worker 0.5: each DDP rank needs a GPU of its own (NCCL refuses two ranks on one GPU)"),
    (["--use-gpu", "--gpus-per-worker", "2"],
     "--gpus-per-worker 2: a worker trains on one GPU unless its model is split over several; give "
     "--gpus-per-worker 1 (more GPUs: more --num-workers), or --model-parallel 2 to split the model over 2 GPUs"),
    (["--gpus-per-worker", "4"], "--gpus-per-worker 4: a worker trains on one GPU unless"),  # --use-gpu auto
    (["--config", "nope.yaml"], "cannot read config file nope.yaml"),
    (["--dataset", "cifar10", "--data-dir", "empty"], "not found in"),
    (["--resume", "no-such-run"], "neither a run folder"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--model", "tune_cnn", "--model-arg", "l3=4"],
     "--model-arg l3=4: tune_cnn takes l1 (int, default 120), l2 (int, default 84)"),
    (["--model", "tune_cnn", "--model-arg", "l1=wide"], "--model-arg l1='wide' is not a valid int: tune_cnn takes"),
    (["--model", "wrn", "--model-arg", "depth=15"], "--model-arg depth=15: depth 15 is not 6n+4"),
    (["--model-arg", "l1"], "--model-arg 'l1' must look like NAME=VALUE"),
    (["--model", "wrn_dli", "--input-size", "64"], "--model wrn_dli reads images of 28 to 55 pixels a side, but this "
                                                    "run feeds it 64"),
    (["--num-workers", "2-8", "--min-workers", "3"], "--num-workers '2-8' with --min-workers 3: the range already "
                                                     "sets the fewest workers (2); give the range alone"),
    (["--tta"], "--tta averages each image with its mirror, which a model trained under --augment auto (crop on "
                "digits) never sees"),
    (["--wandb-project", "foo"], "--wandb-project foo without --wandb: nothing would be logged to W&B; add --wandb, "
                                 "or drop --wandb-project"),
])
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, args, message):
    import ray

    from raydist.ray_edge import session

    connects = []  # this process may already be on the session's cluster: watch for a new start or join
    monkeypatch.setattr(ray, "init", lambda *a, **k: connects.append(("ray.init", a, k)))
    monkeypatch.setattr(session, "connect", lambda *a, **k: connects.append(("connect", a, k)))
    monkeypatch.chdir(tmp_path)
    code, err = _main(*args, "--storage-path", str(tmp_path / "runs"), capsys=capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "runs").exists()  # nothing half-written
    assert connects == []  # no cluster started or joined


@pytest.mark.parametrize("where, says", [("/proc/raydist-runs", "cannot create folders in /proc"),
                                         ("FILE/runs", "is a file, not a folder")])
def test_a_storage_path_that_cannot_be_written_is_refused_before_ray(tmp_path, capsys, where, says):
    """Checked by trying (as root, os.access says yes to /proc and read-only mounts)."""
    (tmp_path / "FILE").write_text("")
    where = where.replace("FILE", str(tmp_path / "FILE"))
    code, err = _main("--storage-path", where, capsys=capsys)
    assert code == 2 and err.startswith(f"raydist.train: error: --storage-path {where}: ") and says in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]


def test_cli_process_exits_2_before_importing_ray(tmp_path):
    result = _cli("--lr", "0", "--storage-path", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "raydist.train: error: --lr must be positive, got 0.0"
    assert not (tmp_path / "runs").exists()


def test_missing_dataset_names_folder_and_flag(tmp_path, capsys):
    code, err = _main("--dataset", "cifar10", "--data-dir", str(tmp_path / "nodata"), capsys=capsys)
    assert code == 2
    assert str(tmp_path / "nodata") in err and "--download" in err


def test_help_lists_grouped_flags(tmp_path):
    result = _cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    for group in ("data:", "model:", "optimization:", "schedule:", "scaling:", "output:"):
        assert group in result.stdout
    assert "--grad-accum" in result.stdout and "--target-accuracy" in result.stdout


def _fake_run_dir(root, name="old-run", epochs=(1, 2, 3), **saved):
    import yaml

    from raydist.runs.checkpoints import checkpoint_bytes

    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(TrainConfig(name=name, storage_path=str(root),
                                                                    **saved).to_dict()))
    for epoch in epochs:
        (run_dir / f"checkpoint_epoch_{epoch:04d}").mkdir()
        # A readable checkpoint: one cut short is skipped (tests/test_faults.py)
        (run_dir / f"checkpoint_epoch_{epoch:04d}" / "checkpoint.pt").write_bytes(checkpoint_bytes({"epoch": epoch}))
    return run_dir


def test_resume_a_run_folder_in_place_lets_ray_pick_the_latest_checkpoint(tmp_path):
    from raydist.run_config import prepare

    run_dir = _fake_run_dir(tmp_path)
    explicit = {"resume": str(run_dir)}
    cfg = prepare(TrainConfig(**explicit), explicit)
    assert (cfg.storage_path, cfg.name, cfg.resume) == (str(tmp_path), "old-run", str(run_dir))


def test_wandb_project_on_resume_is_judged_by_the_resumed_runs_own_wandb_setting(tmp_path):
    """--wandb-project without --wandb is refused; on --resume the run's saved `wandb` counts (the check ran
    before the run's config was read and refused a project for a run that logs to W&B)."""
    from raydist.run_config import prepare

    logged = _fake_run_dir(tmp_path, name="logged", wandb=True)
    cfg = prepare(*parse_cli(["--resume", str(logged), "--wandb-project", "other", "--epochs", "5"]))
    assert (cfg.wandb, cfg.wandb_project, cfg.name) == (True, "other", "logged")
    plain = _fake_run_dir(tmp_path, name="plain")
    with pytest.raises(ConfigError, match="--wandb-project other without --wandb: nothing would be logged"):
        prepare(*parse_cli(["--resume", str(plain), "--wandb-project", "other", "--epochs", "5"]))


def test_resume_a_run_folder_under_another_name_starts_from_its_latest_checkpoint(tmp_path):
    from raydist.run_config import prepare

    run_dir = _fake_run_dir(tmp_path, epochs=(2, 10, 7))
    explicit = {"resume": str(run_dir), "name": "continued", "storage_path": str(tmp_path / "elsewhere")}
    cfg = prepare(TrainConfig(**explicit), explicit)
    assert cfg.name == "continued" and cfg.storage_path == str(tmp_path / "elsewhere")
    assert cfg.resume == str(run_dir / "checkpoint_epoch_0010")


@pytest.mark.parametrize("flag, value", [("--model", "resnet18"), ("--dataset", "fake"), ("--optimizer", "adamw"),
                                         ("--val-fraction", "0.3"), ("--classes", "0-4"), ("--grey-input", "sum")])
def test_resume_refuses_settings_a_checkpoint_cannot_continue_with(tmp_path, monkeypatch, capsys, flag, value):
    import yaml

    from raydist.ray_edge import session

    run_dir = tmp_path / "runs" / "old"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(TrainConfig().to_dict()))
    before = sorted(p.name for p in run_dir.iterdir())
    monkeypatch.setattr(session, "connect", lambda *a, **k: pytest.fail("a cluster was started"))
    code, err = _main("--resume", str(run_dir), flag, value, capsys=capsys)
    assert code == 2
    name = flag[2:].replace("-", "_")
    given = TrainConfig.from_dict({name: value}).to_dict()[name]
    old = "unset" if getattr(TrainConfig, name) is None else getattr(TrainConfig, name)
    assert err.strip() == (f"raydist.train: error: --resume {run_dir}: {flag} {given} differs from the run's "
                           f"{old}; a checkpoint continues with the same {name} (start a "
                           f"new run with {flag} {given} instead)")
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_resume_refuses_other_model_arguments(tmp_path, monkeypatch, capsys):
    import yaml

    from raydist.ray_edge import session

    run_dir = tmp_path / "runs" / "old"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(TrainConfig(model="tune_cnn", model_args={"l1": 32}).to_dict()))
    monkeypatch.setattr(session, "connect", lambda *a, **k: pytest.fail("a cluster was started"))
    code, err = _main("--resume", str(run_dir), "--model", "tune_cnn", "--model-arg", "l1=64", capsys=capsys)
    assert code == 2
    assert err.strip() == (f"raydist.train: error: --resume {run_dir}: --model-arg l1=64 differs from the run's "
                           f"l1=32; a checkpoint continues with the same model arguments (start a new run for "
                           f"another shape)")


@pytest.mark.parametrize("content, says", [("", "holds nothing, not the run's config"),
                                           ("- 1\n- 2\n", "holds list, not the run's config"),
                                           ("epochs: [1\n", "is not valid YAML")])
def test_resume_from_a_folder_whose_saved_config_is_broken_is_one_line(tmp_path, capsys, content, says):
    run_dir = _fake_run_dir(tmp_path)
    (run_dir / "config.yaml").write_text(content)
    code, err = _main("--resume", str(run_dir), capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"--resume: {run_dir}/config.yaml {says}" in err


def test_resume_with_no_epochs_left_says_so_instead_of_writing_an_empty_final_model(tmp_path, capsys):
    import torch

    run_dir = _fake_run_dir(tmp_path, epochs=(2, 5))
    code, err = _main("--resume", str(run_dir), "--epochs", "5", capsys=capsys)
    assert code == 2
    assert err.strip() == (f"raydist.train: error: --resume {run_dir}: the run has trained 5 epoch(s) and --epochs 5 "
                           f"is the total from its start, so nothing is left to do; give --epochs above 5 to train more")
    checkpoint = run_dir / "checkpoint_epoch_0002"
    torch.save({"epoch": 2, "config": TrainConfig(epochs=2).to_dict()}, checkpoint / "checkpoint.pt")
    code, err = _main("--resume", str(checkpoint), "--storage-path", str(tmp_path / "new"), capsys=capsys)
    assert code == 2 and "the run has trained 2 epoch(s) and --epochs 2 is the total" in err  # the saved epochs
    assert not (tmp_path / "new").exists()


def test_resume_refuses_to_switch_between_scratch_and_pretrained(tmp_path, monkeypatch, capsys):
    import yaml

    from raydist.ray_edge import session

    run_dir = tmp_path / "runs" / "old"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(TrainConfig().to_dict()))
    monkeypatch.setattr(session, "connect", lambda *a, **k: pytest.fail("a cluster was started"))
    code, err = _main("--resume", str(run_dir), "--weights", str(tmp_path / "w.pt"), capsys=capsys)
    assert code == 2 and "the run started from scratch; a checkpoint continues as it started" in err
    assert len(err.strip().splitlines()) == 1


def test_every_commands_help_says_each_default_once():
    """`--storage-path ... (default: ./runs) (default: None)`: a help that states its default in its own
    words got argparse's as well (41 lines across raydist.tune, raydist.predict and raydist.scaling)."""
    import re

    from raydist import predict, scaling, tune, cluster
    from raydist.cli import TRAIN_DESCRIPTION, build_parser

    parsers = {"train": build_parser("raydist.train", TRAIN_DESCRIPTION), "tune": tune.build_parser(),
               "predict": predict.build_parser(), "scaling": scaling.build_parser(), "cluster": cluster.build_parser()}
    for name, parser in parsers.items():
        for action in parser._actions:
            if not action.help:
                continue
            text = " ".join(parser._get_formatter()._expand_help(action).split())
            assert len(re.findall(r"\bdefault\b", text, re.I)) <= 1, (name, text)
