"""The README stays true: it documents every flag, and names the install and test commands CI runs."""

import dataclasses
import pathlib

from raydist.config.fields import TrainConfig
from raydist.config.values import flag_name

README = (pathlib.Path(__file__).parent.parent / "README.md").read_text()


def test_every_flag_is_documented():
    flags = ["--model-arg" if f.name == "model_args" else flag_name(f.name) for f in dataclasses.fields(TrainConfig)]
    missing = [flag for flag in flags if f"`{flag}" not in README]
    assert not missing


def test_readme_commands_match_ci():
    ci = (pathlib.Path(__file__).parent.parent / ".ci" / "run").read_text()
    for command in ('pip install -e ".[dev]"', "python -m pytest", "python -m raydist.train"):
        assert command in README
    assert 'pip install -e ".[dev]"' in ci and "python -m pytest" in ci


def test_every_tune_flag_is_documented():
    from raydist.tune import build_parser

    flags = [a.option_strings[0] for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    missing = [flag for flag in flags if f"`{flag}" not in README]
    assert not missing and len(flags) >= 14


def test_readme_names_every_shipped_study():
    from raydist.tune import SEARCH_SPACES

    for path in SEARCH_SPACES.glob("*.yaml"):
        assert f"`{path.stem}`" in README


def test_readme_shows_how_to_run_on_a_cluster():
    for command in ("ray up cluster.yaml", "ray dashboard cluster.yaml", "ray job submit", "ray down cluster.yaml",
                    "ray attach cluster.yaml", "ray start --head", "ray start --address", "RAY_AUTH_MODE=token",
                    "~/.ray/auth_token", "python -m raydist.cluster status", "cluster-local.yaml"):
        assert command in README, command


def _readme_commands(module: str) -> list[list[str]]:
    """Every `python -m <module> ...` line of the README's bash blocks, continuations joined, comments cut."""
    import re
    import shlex

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:3] == ["python", "-m", module]:
                commands.append(words[3:])
    return commands


def _photos_at_home(tmp_path, monkeypatch):
    """The image folder the README's commands name (~/photos), written where ~ points for the test."""
    from image_folders import write_digits_folder

    monkeypatch.setenv("HOME", str(tmp_path))
    write_digits_folder(tmp_path / "photos", per_class=20)


def test_every_documented_study_command_is_accepted(tmp_path, monkeypatch):
    """The README's study commands pass every check a study gets before Ray starts (the data and weights
    they name are on the user's machine, not here: those two checks have tests of their own)."""
    from raydist import tune

    _photos_at_home(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tune, "_check_data", lambda study: None)
    monkeypatch.setattr(tune, "_check_weights", lambda study, on_this_machine: None)
    commands = [args for args in _readme_commands("raydist.tune") if "--resume" not in args and "--list" not in args]
    assert len(commands) >= 5 and any("--set" in args for args in commands)
    for args in commands:
        plan = tune.parse_args(args)
        assert plan.study.num_samples >= 1, args


def test_every_documented_training_command_is_accepted(tmp_path, monkeypatch):
    from raydist import run_config
    from raydist.cli import parse_cli

    _photos_at_home(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_config, "check_data", lambda *a, **k: None)
    monkeypatch.setattr(run_config, "check_weights", lambda *a, **k: None)
    commands = [args for args in _readme_commands("raydist.train") if "--resume" not in args and "--config" not in args]
    assert len(commands) >= 8
    for args in commands:
        cfg, explicit, config_files = parse_cli(args)
        run_config.prepare(cfg, explicit, config_files)


# Flags the README gives to other tools' commands (ray, aws, tensorboard, pip, Horovod's script), each once.
OTHER_TOOLS_FLAGS = {
    "--head": "ray start", "--port": "ray start", "--dashboard-host": "ray start", "--generate": "ray get-auth-token",
    "--filters": "aws ec2", "--owners": "aws ec2", "--query": "aws ec2", "--output": "aws ec2", "--region": "aws ec2",
    "--group-name": "aws ec2 create-placement-group", "--strategy": "aws ec2 create-placement-group",
    "--logdir": "tensorboard", "--no-cache-dir": "pip", "--batches-per-allreduce": "Horovod's train.py",
    "--dry-run": "benchmarks/gpu_check.py", "--json": "benchmarks/gpu_check.py",
    "--fake-": "raydist.train's --fake-* family, named as a group",
    "--version": "helm install", "--from-file": "kubectl create secret", "--working-dir": "ray job submit",
    "--runtime-env-json": "ray job submit",
}


def test_every_commands_flags_are_documented_and_every_flag_the_readme_names_exists():
    """Each of raydist.train, tune, predict, scaling and cluster: every flag of it is in the README; and each
    `--flag` the README names is one of theirs (or another tool's, listed above), so a renamed or removed
    flag cannot stay documented."""
    import argparse
    import re

    from raydist import cluster, export, predict, scaling, tune
    from raydist.cli import TRAIN_DESCRIPTION, build_parser

    def flags(parser) -> set:
        out = set()
        for action in parser._actions:
            out.update(o for o in action.option_strings if o.startswith("--") and o != "--help")
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    out |= flags(sub)
        return out

    commands = {"train": build_parser("raydist.train", TRAIN_DESCRIPTION), "tune": tune.build_parser(),
                "predict": predict.build_parser(), "scaling": scaling.build_parser(), "cluster": cluster.build_parser(),
                "export": export.build_parser()}
    every = set()
    for name, parser in commands.items():
        own = flags(parser)
        assert own, name
        assert not [flag for flag in own if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", README)], name
        every |= own
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", README))
    assert not sorted(named - every - set(OTHER_TOOLS_FLAGS))
