"""The training flags on the command line, shared by `python -m raydist.train` and `raydist.scaling`:
a parser generated from TrainConfig's fields (grouped as the dataclass groups them), --config files and
--preset, layered into one validated config.

    cfg, explicit, config_files = parse_cli(sys.argv[1:])   # ConfigError (exit 2) names a bad value
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from typing import Optional

import yaml

from raydist.config.fields import GROUPS, TrainConfig, base_type, coerce_values, load_yaml
from raydist.config.values import flag_name, is_plain_value, is_worker_range, merge_config_values, split_worker_range
from raydist.config.yaml_files import load_yaml_text
from raydist.data.registry import DATASETS
from raydist.errors import ConfigError
from raydist.preflight import validate


class OneLineErrorParser(argparse.ArgumentParser):
    """Every raydist command's parser: one-line errors (exit 2, like ConfigError), and a description kept
    as written (what the command does, then an example), not re-wrapped."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one line and exit 2, like ConfigError
        self.exit(2, f"{self.prog}: error: {message}\n")

    def format_help(self) -> str:
        """argparse's help with the description first: what the command does before how to type it."""
        formatter = self._get_formatter()
        formatter.add_text(self.description)
        formatter.add_usage(self.usage, self._actions, self._mutually_exclusive_groups)
        for group in self._action_groups:
            formatter.start_section(group.title)
            formatter.add_text(group.description)
            formatter.add_arguments(group._group_actions)
            formatter.end_section()
        formatter.add_text(self.epilog)
        return formatter.format_help()


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written; each flag's default added to its help, unless the help already says its
    default in its own words ("default: the study's"), which argparse would follow with "(default: None)"."""

    def _get_help_string(self, action):
        if "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


TRAIN_DESCRIPTION = """\
Train one image classifier with PyTorch DDP on a Ray cluster: N workers (GPUs or CPUs, one machine or many),
a line per epoch, checkpoints, model_final.pt and curves.png in the run folder. Without --address it starts
a local cluster itself.

example:
  python -m raydist.train --dataset cifar10 --data-dir ~/data --download --model resnet18 --num-workers 4 --use-gpu"""


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    from raydist.data.registry import DATASETS
    from raydist.models.registry import MODELS

    registry_choices = {"dataset": sorted(DATASETS), "model": sorted(MODELS)}
    parser = OneLineErrorParser(prog=prog, description=description, argument_default=argparse.SUPPRESS,
                     usage="%(prog)s [--config FILE.yaml] [FLAG VALUE ...]   (every flag is below)")
    parser.add_argument("--preset", metavar="NAME",
                        help="start from a workflow's settings (dli, horovod-resnet18, workload, "
                             "cifar100-resnet50; --preset list says what each reproduces); --config files and "
                             "flags override it")
    parser.add_argument("--config", metavar="FILE.yaml", action="append",
                        help="YAML file of config keys used as defaults; flags override (repeatable: later files "
                             "override earlier ones)")
    groups = {g: parser.add_argument_group(g) for g in GROUPS}
    for f in dataclasses.fields(TrainConfig):
        kind, _ = base_type(f.name)
        if kind is dict:  # --model-arg NAME=VALUE, repeatable (parse_cli folds them into model_args)
            groups[f.metadata["group"]].add_argument("--model-arg", dest="model_arg", action="append",
                                                     metavar="NAME=VALUE", help=f.metadata["help"])
            continue
        help_text = f.metadata["help"] + (f" (default: {f.default})" if f.default is not None else "")
        choices = f.metadata["choices"] or registry_choices.get(f.name)
        if choices and f.name in registry_choices:
            help_text += "; one of: " + ", ".join(choices)
        group = groups[f.metadata["group"]]
        if kind is bool:
            group.add_argument(flag_name(f.name), dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            # Registry names are checked in validate() so the error lists them in one line.
            group.add_argument(flag_name(f.name), dest=f.name, type=_cli_type(f.name, kind), help=help_text,
                               metavar=("N|MIN-MAX" if f.name == "num_workers" else kind.__name__.upper())
                               if not f.metadata["choices"] else None,
                               choices=f.metadata["choices"])
    return parser


def _cli_type(name: str, kind: type):
    def convert(text: str):
        if name == "num_workers" and is_worker_range(text):
            return text  # a range: split_worker_range reads it (and names a bad one) in resolve()
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
    convert.__name__ = kind.__name__
    return convert


def resolve(explicit: dict, config_files=None, base: Optional[dict] = None) -> TrainConfig:
    """Layer the sources: dataclass defaults < the data set's recipe (raydist.data.registry) < base (a
    resumed run's config) < YAML files, in order < explicit flags. A bad value from a file is named by its
    file and key, not by a flag never typed."""
    if isinstance(config_files, str):
        config_files = [config_files]
    values: dict = {}
    origin: dict = {}  # field -> the file that set it
    if base:
        values.update(coerce_values(base, "resumed config"))
    for path in config_files or []:
        from_file = split_worker_range(load_yaml(path), f"{path}: num_workers")  # a range from a --config file
        if "num_workers" in from_file and "min_workers" not in from_file:
            values.pop("min_workers", None)  # a plain number over an earlier range: a fixed group
        values = merge_config_values(values, from_file)
        origin.update(dict.fromkeys(from_file, path))
    if "num_workers" in explicit and "min_workers" not in explicit:
        values.pop("min_workers", None)  # --num-workers N is a fixed group, whatever a file or a resumed run said
    # (with --resume the run's own settings are not read yet: this check runs again once they are)
    for name in ("wandb_project", "wandb_id"):
        if explicit.get(name) is not None and not (explicit.get("wandb") or values.get("wandb")) \
                and not explicit.get("resume"):
            raise ConfigError(f"{flag_name(name)} {explicit[name]} without --wandb: nothing would be logged to W&B; "
                              f"add --wandb, or drop {flag_name(name)}")
    values = merge_config_values(values, split_worker_range(explicit, "--num-workers"))
    spec = DATASETS.get(values.get("dataset", TrainConfig.dataset))
    for name, value in spec.recipe if spec else ():  # the data set's defaults, under everything given
        values.setdefault(name, value)
    for name in explicit:
        origin.pop(name, None)
    try:
        return validate(TrainConfig(**values))
    except ConfigError as exc:
        raise ConfigError(_name_the_file(str(exc), origin)) from None


def _name_the_file(message: str, origin: dict) -> str:
    """'--lr must be positive' -> 'a.yaml: lr must be positive' when a.yaml set lr."""
    flag = re.match(r"--([a-z0-9-]+)", message)
    name = flag.group(1).replace("-", "_") if flag else None
    if name in origin:
        return f"{origin[name]}: {name}{message[flag.end():]}"
    return message


def parse_cli(argv: Optional[list[str]] = None, prog: str = "raydist.train",
              description: str = TRAIN_DESCRIPTION) -> tuple[TrainConfig, dict, list[str]]:
    """Parse flags into a validated TrainConfig; also return the explicitly given values and the --config files."""
    parser = build_parser(prog, description)
    args = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    config_files = args.pop("config", None) or []
    preset = args.pop("preset", None)
    if preset is not None:
        from raydist import presets

        if preset == "list":
            print(presets.listing())
            sys.exit(0)
        config_files = [presets.path(preset)] + config_files  # the first file: --config files override it
    if "model_arg" in args:
        args["model_args"] = parse_model_args(args.pop("model_arg"))
    return resolve(args, config_files), args, config_files


def parse_model_args(items: list[str]) -> dict:
    """--model-arg NAME=VALUE ...: values read as YAML scalars (64 an int, 0.3 a float, true a bool)."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ConfigError(f"--model-arg {item!r} must look like NAME=VALUE, e.g. --model-arg l1=64")
        try:
            value = load_yaml_text(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        if not is_plain_value(value):
            value = text  # a list, a date or an empty value: the builder's check names it as typed
        out[key] = value
    return out
