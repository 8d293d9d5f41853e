"""The README stays true: it documents every flag, and names the install and test commands CI runs."""

import dataclasses
import pathlib

from raydist.config import TrainConfig, _flag

README = (pathlib.Path(__file__).parent.parent / "README.md").read_text()


def test_every_flag_is_documented():
    missing = [_flag(f.name) for f in dataclasses.fields(TrainConfig) if f"`{_flag(f.name)}" not in README]
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
