"""Population-based training: the study file's pbt/pb2 settings and refusals, the values PBT may move to,
the exploit's copy and history (raydist.runs.lineage) on real checkpoint files, and real PBT and PB2
studies on digits through `python -m raydist.tune` (the session cluster)."""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import best_trial_of, digits_val_accuracy, read_csv, run_study_file

from raydist.errors import ConfigError
from raydist.runs.checkpoints import CHECKPOINT_FILE, checkpoint_bytes, checkpoint_folders, checkpoints_to_keep
from raydist.runs.history import HistoryWriter, read_history
from raydist.runs.lineage import Donor, DonorGone, adopt, already_adopted, lineage, lineage_line
from raydist.study.distributions import read_distribution
from raydist.study.population import PERTURBABLE, nearest
from raydist.study.study_file import load_study, save_study

SHIPPED = Path(__file__).resolve().parents[1] / "search_spaces" / "digits_pbt.yaml"

STUDY = """
num_samples: 4
scheduler: {type: pbt, perturbation_interval: 2}
fixed: {dataset: digits, model: resnet8, num_workers: 1, epochs: 6}
searched:
  lr: {loguniform: [0.02, 2.0]}
  batch_size: {choice: [32, 64]}
"""


def _load(tmp_path, text: str, **kwargs):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return load_study(str(path), **kwargs)


def test_a_pbt_study_draws_its_first_population_at_random_and_perturbs_only_what_can_change_mid_run(tmp_path):
    study = _load(tmp_path, STUDY)
    assert study.population and study.search == "random" and study.perturbation_interval == 2
    from raydist.study.population import perturbed_fields

    assert perturbed_fields(study.searched) == ["lr"]  # batch_size is drawn once and travels with the weights
    save_study(study, str(tmp_path / "exp"))  # --resume reads the study back as it ran
    again = load_study(str(tmp_path / "exp" / "study.yaml"))
    assert (again.scheduler, again.perturbation_interval, again.quantile_fraction, again.resample_probability,
            again.search) == ("pbt", 2, 0.25, 0.25, "random")
    shipped = load_study(str(SHIPPED))
    assert shipped.scheduler == "pbt" and set(perturbed_fields(shipped.searched)) == {"lr", "weight_decay", "mixup"}


@pytest.mark.parametrize("change, words", [
    ("search: {algorithm: hyperopt}\n", "search.algorithm hyperopt cannot run under scheduler pbt"),
    ("metric: [val_acc, trainable_params]\n", "pbt ranks the population by one"),
    ("num_samples: 1\n", "num_samples 1: pbt needs a population of at least 2"),
    ("scheduler: {type: pbt, perturbation_interval: 6}\n", "perturbation_interval 6 is not below epochs 6"),
    ("scheduler: {type: pbt, perturbation_interval: 0}\n", "perturbation_interval must be a whole number"),
    ("scheduler: {type: pbt, grace_period: 2}\n", "scheduler.grace_period is ASHA's; pbt takes"),
    ("scheduler: {type: asha, perturbation_interval: 2}\n", "perturbation_interval is population-based"),
    ("scheduler: {type: pbt, quantile_fraction: 0.75}\n", "quantile_fraction must be a number in (0, 0.5]"),
    ("scheduler: {type: pb2, resample_probability: 0.5}\n", "resample_probability is PBT's"),
])
def test_a_pbt_study_that_cannot_run_is_refused_in_one_line(tmp_path, change, words):
    text = STUDY.replace("num_samples: 4\n", "").replace("scheduler: {type: pbt, perturbation_interval: 2}\n", "")
    if "scheduler" not in change:
        change += "scheduler: {type: pbt, perturbation_interval: 2}\n"
    if "num_samples" not in change:
        change += "num_samples: 4\n"
    with pytest.raises(ConfigError, match=re.escape(words)):
        _load(tmp_path, change + text)


@pytest.mark.parametrize("searched, fixed, words", [
    ("  batch_size: {choice: [32, 64]}\n", "", "none of this study's can change mid-run; search one of: lr"),
    ("  lr: {loguniform: [0.02, 2.0]}\n  epochs: {choice: [4, 6]}\n", None, "searched.epochs: under pbt every trial"),
    ("  optimizer: {choice: [sgd, adamw]}\n  backbone_lr_mult: {loguniform: [0.1, 1.0], when: {optimizer: [sgd]}}\n"
     "  lr: {loguniform: [0.02, 2.0]}\n", "", "searched.backbone_lr_mult has a condition (when), but pbt"),
    ("  lr: {loguniform: [0.02, 2.0]}\n", ", num_workers: 2", "this study has trials of 2 worker(s)"),
    ("  lr: {loguniform: [0.02, 2.0]}\n", ", checkpoint_every: 3", "perturbation_interval 2 is not a multiple of "
                                                                  "checkpoint_every 3"),
    ("  lr: {loguniform: [0.02, 2.0]}\n", ", checkpoint_every: 0", "checkpoint_every 0 saves only the last epoch"),
    ("  lr: {loguniform: [0.02, 2.0]}\n  cpus_per_worker: {choice: [1, 2]}\n", "",
     "searched.cpus_per_worker: under pbt a trial that takes another's weights takes its values too, but keeps"),
])
def test_what_pbt_cannot_perturb_is_refused_before_ray_starts(tmp_path, searched, fixed, words):
    epochs = "" if fixed is None else f", epochs: 6{fixed}"
    text = ("num_samples: 4\nscheduler: {type: pbt, perturbation_interval: 2}\n"
            f"fixed: {{dataset: digits, model: resnet8{epochs}}}\nsearched:\n{searched}")
    with pytest.raises(ConfigError, match=re.escape(words)):
        _load(tmp_path, text)


def test_pb2_models_ranges_only(tmp_path):
    text = STUDY.replace("type: pbt", "type: pb2").replace("batch_size: {choice: [32, 64]}",
                                                              "label_smoothing: {choice: [0.0, 0.1]}")
    with pytest.raises(ConfigError, match=re.escape("searched.label_smoothing is a choice, and PB2 models ranges")):
        _load(tmp_path, text)


def test_the_command_line_can_ask_for_pbt_and_an_explicit_searcher_is_refused(tmp_path):
    text = STUDY.replace("scheduler: {type: pbt, perturbation_interval: 2}\n", "")
    assert _load(tmp_path, text, settings={"scheduler": "pbt"}).search == "random"
    with pytest.raises(ConfigError, match="search.algorithm optuna cannot run under scheduler pbt"):
        _load(tmp_path, text, settings={"scheduler": "pbt", "search": "optuna"})


def test_a_perturbed_value_is_kept_in_what_its_field_samples():
    def dist(spec, name="lr"):
        return read_distribution("s.yaml", name, spec, float)

    assert nearest(dist({"loguniform": [0.02, 2.0]}), 2.4) == 2.0  # x1.2 past the top
    assert nearest(dist({"loguniform": [0.02, 2.0]}), 0.5) == 0.5
    assert nearest(dist({"quniform": [0.0, 0.2, 0.05]}, "label_smoothing"), 0.13) == 0.15  # the nearest on the grid
    assert nearest(dist({"qloguniform": [0.1, 2.0, 0.1]}), 0.37) == pytest.approx(0.4)
    assert nearest(dist({"qloguniform": [0.1, 2.0, 0.1]}), 0.05) == pytest.approx(0.1)
    choice = dist({"choice": [0.0, 0.1, 0.2]}, "label_smoothing")
    assert nearest(choice, 0.1) == 0.1
    with pytest.raises(ValueError):
        nearest(choice, 0.15)  # a choice moves by PBT's shift, never by a factor
    assert set(PERTURBABLE) >= {"lr", "weight_decay", "mixup", "random_erase"}


def test_ray_pbt_explore_step_stays_in_the_searched_range(tmp_path):
    """Ray's own explore step (a range multiplied, a grid shifted, or a fresh draw) as the scheduler runs it."""
    import random

    from ray.tune.schedulers.pbt import _explore

    from raydist.ray_edge.population import population_scheduler

    study = _load(tmp_path, STUDY.replace("batch_size: {choice: [32, 64]}",
                                          "label_smoothing: {quniform: [0.0, 0.2, 0.05]}"))
    scheduler = population_scheduler(study)
    random.seed(0)
    seen = set()
    for _ in range(200):
        config, operations = _explore({"lr": 1.9, "label_smoothing": 0.05, "batch_size": 32},
                                      scheduler._hyperparam_mutations, study.resample_probability,
                                      scheduler._perturbation_factors, scheduler._custom_explore_fn)
        assert 0.02 <= config["lr"] <= 2.0 and config["label_smoothing"] in (0.0, 0.05, 0.1, 0.15, 0.2)
        assert config["batch_size"] == 32  # not perturbed: it travels with the weights
        if operations["lr"] != "resample":
            assert config["lr"] in (2.0, pytest.approx(1.9 * 0.8))  # x1.2 kept at the top of the range
            seen.add(operations["lr"])
        if operations["label_smoothing"] != "resample":
            assert config["label_smoothing"] in (0.0, 0.1)  # a neighbour on the grid
    assert seen == {"* 1.2", "* 0.8"}
    assert scheduler.last_epoch == 6


def test_a_trial_keeps_its_last_two_offers_whatever_their_metric():
    kept = [({"epoch": e, "val_acc": acc}, f"c{e}") for e, acc in [(1, .5), (2, .4), (3, .9), (4, .3), (5, .8), (6, .2),
                                                                    (7, .7)]]
    assert checkpoints_to_keep(kept, "val_acc", 2) == {"c3", "c5", "c7"}  # the best two and the latest
    assert checkpoints_to_keep(kept, "val_acc", 2, pin_every=2) == {"c3", "c5", "c7", "c4", "c6"}


def _checkpoint(folder: Path, epoch: int, val_acc: float, weight: float) -> str:
    (folder).mkdir(parents=True, exist_ok=True)
    (folder / CHECKPOINT_FILE).write_bytes(checkpoint_bytes(
        {"model": {"w": torch.full((3,), weight)}, "optimizer": {"state": {}, "param_groups": []}, "epoch": epoch,
         "metrics": {"epoch": epoch, "val_acc": val_acc, "val_loss": 1 - val_acc}}))
    return str(folder)


def _trial(tmp_path, trial_id: str, accs: list, values: dict) -> tuple[Path, Path]:
    """A trial folder as a PBT trial leaves it: its history (values on each epoch) and a checkpoint per epoch."""
    trial_path, run_dir = tmp_path / f"trial_{trial_id}", tmp_path / f"trial_{trial_id}" / f"s.{trial_id}"
    writer = HistoryWriter(str(trial_path))
    for epoch, acc in enumerate(accs, start=1):
        path = _checkpoint(run_dir / f"checkpoint_epoch_{epoch:04d}", epoch, acc, weight=float(epoch))
        writer.add({"epoch": epoch, "val_acc": acc, "values": values}, path)
    return trial_path, run_dir


def test_an_exploit_copies_the_donors_checkpoint_and_the_history_says_where_the_weights_came_from(tmp_path):
    donor_path, donor_run = _trial(tmp_path, "b", [0.6, 0.9, 0.95, 0.97], {"lr": 0.4})
    trial_path, run_dir = _trial(tmp_path, "a", [0.2, 0.3, 0.35, 0.4], {"lr": 0.02})
    donor = Donor("b", str(donor_run / "checkpoint_epoch_0004"), 4, {"lr": 0.4})
    record = adopt(donor, trial_path=str(trial_path), run_dir=str(run_dir), values={"lr": 0.48}, metric="val_acc")
    # the old lineage's weights from epoch 4 on are gone (older ones stay: an offer of one may still be taken);
    # the donor's epoch-4 file is the trial's latest checkpoint, byte for byte
    assert checkpoint_folders(str(run_dir)) == [f"{run_dir}/checkpoint_epoch_{e:04d}" for e in (1, 2, 3, 4)]
    assert torch.load(run_dir / "checkpoint_epoch_0003" / CHECKPOINT_FILE, weights_only=True)["model"]["w"][0] == 3
    assert (run_dir / "checkpoint_epoch_0004" / CHECKPOINT_FILE).read_bytes() == \
        (donor_run / "checkpoint_epoch_0004" / CHECKPOINT_FILE).read_bytes()
    history = read_history(str(trial_path))
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and history[-1] == record
    assert record["val_acc"] == 0.97 and record["exploited"]["trial"] == "b" and record["exploited"]["epoch"] == 4
    assert record["exploited"]["from"] == {"lr": 0.4} and record["exploited"]["to"] == {"lr": 0.48}
    assert record["exploited"]["replaced"] == [4] and record["exploited"]["own_val_acc"] == 0.4
    assert record["checkpoint_path"] == f"{run_dir}/checkpoint_epoch_0004"
    # Tune hands the same offer back on a restart after a failure: it is not taken twice ...
    assert already_adopted(history, donor, interval=2)
    writer = HistoryWriter(str(trial_path))
    writer.add({"epoch": 5, "val_acc": 0.975, "values": {"lr": 0.48}}, None)
    assert already_adopted(read_history(str(trial_path)), donor, interval=2)
    # ... but once the trial has offered a checkpoint of its own, the same donor's offer is a new exploit
    writer.add({"epoch": 6, "val_acc": 0.98, "values": {"lr": 0.48}}, _checkpoint(run_dir / "checkpoint_epoch_0006", 6,
                                                                                  0.98, 6.0))
    assert not already_adopted(read_history(str(trial_path)), donor, interval=2)
    segments = lineage(read_history(str(trial_path)), "a")
    assert segments == [{"trial": "b", "epochs": [1, 4], "values": {"lr": 0.4}},
                        {"trial": "a", "epochs": [5, 6], "values": {"lr": 0.48}}]
    assert lineage_line(segments) == "epochs 1-4 trial b (lr 0.4), 5-6 trial a (lr 0.48)"


def test_a_lineage_follows_the_donors_own_exploits(tmp_path):
    _, c_run = _trial(tmp_path, "c", [0.7, 0.9], {"lr": 1.0})
    b_path, b_run = _trial(tmp_path, "b", [0.1, 0.2], {"lr": 0.1})
    adopt(Donor("c", str(c_run / "checkpoint_epoch_0002"), 2, {"lr": 1.0}), trial_path=str(b_path),
          run_dir=str(b_run), values={"lr": 0.8}, metric="val_acc")
    writer = HistoryWriter(str(b_path))
    for epoch in (3, 4):
        writer.add({"epoch": epoch, "val_acc": 0.9 + epoch / 100, "values": {"lr": 0.8}},
                   _checkpoint(b_run / f"checkpoint_epoch_{epoch:04d}", epoch, 0.9, float(epoch)))
    a_path, a_run = _trial(tmp_path, "a", [0.1, 0.1, 0.1, 0.1], {"lr": 0.01})
    adopt(Donor("b", str(b_run / "checkpoint_epoch_0004"), 4, {"lr": 0.8}), trial_path=str(a_path),
          run_dir=str(a_run), values={"lr": 0.64}, metric="val_acc")
    assert lineage(read_history(str(a_path)), "a") == [{"trial": "c", "epochs": [1, 2], "values": {"lr": 1.0}},
                                                       {"trial": "b", "epochs": [3, 4], "values": {"lr": 0.8}}]


def test_an_offer_whose_checkpoint_is_gone_is_said(tmp_path):
    trial_path, run_dir = _trial(tmp_path, "a", [0.2, 0.3], {"lr": 0.02})
    with pytest.raises(DonorGone):
        adopt(Donor("b", str(tmp_path / "gone" / "checkpoint_epoch_0002"), 2, {}), trial_path=str(trial_path),
              run_dir=str(run_dir), values={}, metric="val_acc")
    assert len(checkpoint_folders(str(run_dir))) == 2  # nothing of the trial's own was touched


# ---- real studies ----------------------------------------------------------------------------------------

# The shipped study, with its first population pinned: one learning rate far too small (about 50% at epoch 4
# where the others pass 95%), so the bottom quarter always has a trial that must take another's weights.
PINNED = "\npoints_to_evaluate:\n" + "".join(
    f"  - {{lr: {lr}, weight_decay: 0.0001, mixup: {mixup}}}\n" for lr, mixup in
    [(0.02, 0.3), (0.4, 0.0), (0.3, 0.1), (1.0, 0.0)])


def test_a_pbt_study_on_digits_moves_weights_between_trials_and_its_histories_say_where_they_came_from(
        ray_cluster, tmp_path):
    stdout, experiment = run_study_file(ray_cluster, tmp_path, SHIPPED.read_text() + PINNED, "pbt")
    assert "random search, pbt scheduler" in stdout
    assert "PBT: every 2 epochs the bottom 25% of the trials take the weights of the top 25% and perturb lr, " \
           "weight_decay, mixup" in stdout
    exploits = re.findall(r"trial (\S+) \(val_acc [\d.]+%\) takes trial (\S+)'s weights of epoch (\d+)", stdout)
    assert exploits, stdout[-3000:]
    study = load_study(str(SHIPPED))
    histories = {p.name.removeprefix("trial_"): read_history(str(p)) for p in experiment.glob("trial_*")}
    records = {t: [h for h in history if h.get("exploited")] for t, history in histories.items()}
    assert any(records.values())
    for trial, history in histories.items():
        epochs = [h["epoch"] for h in history]
        assert epochs == sorted(set(epochs)) and epochs[-1] == 8  # one lineage, to the last epoch
        if not records[trial]:
            continue
        record = records[trial][-1]  # an earlier one may have been replaced by a later exploit to an earlier epoch
        source = record["exploited"]
        donor, epoch = source["trial"], source["epoch"]
        assert (trial, donor, str(epoch)) in exploits  # the console said it
        # the donor's own record of that epoch (unless a later exploit of its own replaced it)
        at = next((h for h in histories[donor] if h["epoch"] == epoch and not h.get("exploited")), None)
        if at is not None:
            assert source["from"] == at["values"]  # the donor's values when it trained those weights
            assert record["val_acc"] == at["val_acc"]  # the exploited epoch stands for the donor's model there
        assert record["epoch"] == epoch and all(e >= epoch for e in source["replaced"])
        after = next(h for h in history if h["epoch"] == epoch + 1)
        assert after["values"] == source["to"]  # the next epoch trained with the perturbed values
        for name, value in source["to"].items():  # x0.8 / x1.2 of the donor's or a fresh draw, kept in range
            low, high = study.searched[name].args
            assert low <= value <= high, (name, value)
    rows = {r["trial_id"]: r for r in read_csv(experiment / "results.csv")}
    assert {t: int(r["exploits"]) for t, r in rows.items()} == {t: len(r) for t, r in records.items()}
    for trial, row in rows.items():  # the best weights' lineage goes through the last exploit before them
        last = next((h for h in reversed(histories[trial]) if h["epoch"] <= int(row["best_epoch"])
                     and h.get("exploited")), None)
        assert row["lineage"].startswith("epochs 1") and \
            f"trial {last['exploited']['trial'] if last else trial}" in row["lineage"]
    assert all(r["status"] == "finished" and r["epochs_run"] == "8" for r in rows.values())
    best = best_trial_of(rows.values())  # an exploit copies a donor's epoch: two trials can tie, ranking breaks it
    assert float(best["best_val_acc"]) > 0.95  # it learned (the SVC's 98.8% is the bar the recipes aim at)
    assert re.search(rf"best trial {best['trial_id']}: .*\n  checkpoint: .*\n  trained by:   epochs 1-", stdout)
    assert "retrain it" not in stdout  # its values changed mid-run: one config would not say how it trained
    saved = torch.load(experiment / "best_model.pt", map_location="cpu", weights_only=False)
    assert saved["trial_id"] == best["trial_id"]
    assert digits_val_accuracy(saved) == pytest.approx(float(best["best_val_acc"]), abs=1e-6)
    donor = exploits[0][1]
    offers = sorted((experiment / f"trial_{donor}").glob("checkpoint_0*"))
    assert offers and json.loads((offers[0] / "raydist_offer.json").read_text())["trial_id"] == donor
    assert all(sum(f.stat().st_size for f in o.iterdir()) < 4096 for o in offers)  # Tune keeps offers, not weights


PB2_STUDY = """
num_samples: 4
scheduler: {type: pb2, perturbation_interval: 2, quantile_fraction: 0.5}
fixed: {dataset: digits, model: resnet8, num_workers: 1, warmup_epochs: 1, epochs: 6}
searched:
  lr: {loguniform: [0.02, 2.0]}
  label_smoothing: {quniform: [0.0, 0.2, 0.05]}
points_to_evaluate:
  - {lr: 0.02, label_smoothing: 0.2}
  - {lr: 0.4, label_smoothing: 0.0}
"""


def test_a_pb2_study_picks_new_values_in_range_and_on_their_grid(ray_cluster, tmp_path):
    stdout, experiment = run_study_file(ray_cluster, tmp_path, PB2_STUDY, "pb2")
    assert "random search, pb2 scheduler" in stdout
    records = [h for p in experiment.glob("trial_*") for h in read_history(str(p)) if h.get("exploited")]
    assert records, stdout[-3000:]
    for record in records:
        to = record["exploited"]["to"]
        assert 0.02 <= to["lr"] <= 2.0 and to["label_smoothing"] in (0.0, 0.05, 0.1, 0.15, 0.2)
    rows = read_csv(experiment / "results.csv")
    assert max(float(r["best_val_acc"]) for r in rows) > 0.95
