"""`python -m raydist.train`: one training run as N DDP workers of a Ray Train TorchTrainer.

    python -m raydist.train                                   # resnet8 on digits, local cluster, 2 CPU workers
    python -m raydist.train --dataset cifar10 --data-dir ~/data --model wrn16_4 --num-workers 4 --use-gpu
    python -m raydist.train --address auto                    # join a running cluster (`ray start --head`)
    python -m raydist.train --resume runs/digits-resnet8-20261123-101500 --epochs 30

Flags come from raydist.config.fields.TrainConfig (`--help` lists them all). Bad input exits with code 2 before
Ray starts; a failed run exits 1.
"""

from __future__ import annotations

import sys
from typing import Optional

from raydist import final_eval
from raydist.cli import parse_cli
from raydist.errors import ConfigError
from raydist.output import console
from raydist.output.mistakes import PER_CLASS_FILE
from raydist.output.run_curves import CURVES_FILE
from raydist.ray_edge import measure
from raydist.ray_edge.fit import RunSummary, failure_cause, fit
from raydist.ray_edge.session import disconnect
from raydist.ray_edge.status import give_back_requests
from raydist.run_config import prepare


def print_summary(summary: RunSummary) -> None:
    last = summary.history[-1] if summary.history else {}
    lines = [f"finished {len(summary.history)} epoch(s) in {summary.seconds:.1f}s"]
    if last:
        lines[0] += f": val acc {last['val_acc']:.2%}, val loss {last['val_loss']:.4f} at epoch {last['epoch']}"
        if last.get("stop_reason"):
            lines[0] += f" (stopped early: {last['stop_reason']}{': ' + last['divergence'] if last.get('divergence') else ''})"
    if summary.best_val_acc is not None:
        lines.append(f"best checkpoint:  {summary.best_checkpoint}  (val acc {summary.best_val_acc:.2%})")
    lines += [f"final model:      {summary.final_model}", f"curves:           {summary.run_dir}/{CURVES_FILE}"]
    if summary.confusion_picture:  # per_class.csv is what it was drawn from
        lines.append(f"mistakes:         {summary.run_dir}/{PER_CLASS_FILE} and {summary.confusion_picture}")
    lines.append(f"run folder:       {summary.run_dir}")
    print("\n".join(lines), flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    try:
        cfg, explicit, config_files = parse_cli(argv)
        cfg = prepare(cfg, explicit, config_files)
    except ConfigError as exc:
        print(f"raydist.train: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(console.run_start_lines(cfg)), flush=True)  # the whole config goes to config.yaml
    try:
        summary = fit(cfg)
    except ConfigError as exc:  # resource checks against a running cluster
        print(f"raydist.train: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit):  # Ctrl+C: one line, not a traceback, and the cluster given back
        # Once the run has started, Ray Train's own SIGINT handler aborts its controller and leaves fit()
        # through sys.exit (SystemExit); before that, Ctrl+C is Python's KeyboardInterrupt. Disconnecting
        # ends this driver's Ray job; Ray then removes the run's worker group and its placement group
        # (measured in docs/reliability.md). The checkpoints written so far stay.
        give_back_requests(cfg.name)
        disconnect()
        run_dir = f"{cfg.storage_path}/{cfg.name}"
        print(f"raydist.train: interrupted; continue from the latest checkpoint with: python -m raydist.train "
              f"--resume {run_dir}", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a failed run is reported in one line, with Ray's log above it
        from raydist.ray_edge.failures import write_error_log

        cause = failure_cause(exc)
        log = write_error_log(f"{cfg.storage_path}/{cfg.name}", exc)
        disconnect()
        if log:
            print(f"raydist.train: every worker's traceback: {log}", file=sys.stderr)
        print(f"raydist.train: training failed: {cause}", file=sys.stderr)
        return 1
    test_line = final_eval.summary_line(measure.measure_run(cfg, summary))  # the test split, once, at the end
    print_summary(summary)
    if test_line:
        print(test_line, flush=True)
    last = summary.history[-1] if summary.history else {}
    return 1 if last.get("stop_reason") == "diverged" else 0


if __name__ == "__main__":
    sys.exit(main())
