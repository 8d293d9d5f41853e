"""What the model gets wrong (issue 33): top-5 accuracy, per-class accuracy and the confusion matrix, counted
exactly in the one evaluation path (raydist.loop.evaluate), written as per_class.csv and drawn as
confusion.png. The 2-worker sums, a run folder's files and a study's best trial's are tested where those
run: tests/test_ray_train.py, tests/test_tune.py, tests/test_ddp_exact.py (bit-identical after a resume).
"""

import os

import pytest
import torch
from local_ddp import run_ddp
from torch import nn

from raydist.config.fields import TrainConfig
from raydist.data.sources import load_splits
from raydist.loop.evaluate import evaluate_model
from raydist.output.mistakes import draw_confusion, per_class_csv, per_class_rows, read_per_class_csv
from raydist.preflight import validate
from raydist.runs.checkpoints import CHECKPOINT_FILE, load_checkpoint_file

RANKING = [3, 1, 4, 0, 2, 9, 8, 7, 6, 5]  # the fixed model's classes, most likely first


class FixedRanking(nn.Module):
    """Ranks the classes as RANKING whatever the image: predicts 3, has 3, 1, 4, 0, 2 as its top five."""

    def forward(self, x):
        logits = torch.zeros(len(x), 10)
        logits[:, RANKING] = torch.arange(10, 0, -1, dtype=torch.float32)
        return logits


def test_the_evaluation_counts_top_five_and_every_true_and_predicted_pair():
    (val,) = load_splits("digits", ("val",), device="cpu")
    labels = val.labels
    sums = evaluate_model(FixedRanking(), val, TrainConfig(), device=torch.device("cpu"))
    assert sums.count.item() == 359 and sums.correct.item() == (labels == 3).sum().item()
    assert sums.top5.item() == sum(int((labels == c).sum()) for c in RANKING[:5])
    expected = torch.zeros(10, 10)
    expected[:, 3] = torch.bincount(labels, minlength=10).float()  # every image predicted as 3
    assert torch.equal(sums.confusion, expected.double())


def test_per_class_rows_give_each_class_its_accuracy_and_what_it_is_most_often_taken_for():
    confusion = [[8, 2, 0], [1, 5, 4], [0, 0, 0]]
    rows = per_class_rows(confusion, ["cat", "dog", "fox"])
    assert [(r["name"], r["images"], r["correct"], r["accuracy"]) for r in rows] == [
        ("cat", 10, 8, 0.8), ("dog", 10, 5, 0.5), ("fox", 0, 0, "")]
    assert [(r["most_mistaken_for"], r["times"]) for r in rows] == [("dog", 2), ("fox", 4), ("", 0)]
    text = per_class_csv(confusion, ["cat", "dog", "fox"])
    assert text.splitlines()[0] == ("class,name,images,correct,accuracy,most_mistaken_for,times,"
                                    "predicted_0,predicted_1,predicted_2")
    assert read_per_class_csv(text) == (confusion, ["cat", "dog", "fox"])  # the file alone redraws the picture
    assert [r["name"] for r in per_class_rows(confusion, [])] == ["0", "1", "2"]  # fake data: label numbers


@pytest.mark.parametrize("classes", [3, 100])
def test_the_confusion_picture_is_drawn_for_few_and_for_many_classes(tmp_path, classes):
    confusion = (torch.eye(classes, dtype=torch.long) * 9 + 1).tolist()
    path = tmp_path / "confusion.png"
    draw_confusion(confusion, [f"class {i}" for i in range(classes)], str(path), title="t")
    png = path.read_bytes()
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert png[:4] == b"\x89PNG" and width > height > 400


def test_under_two_worker_ddp_each_checkpoint_keeps_its_epochs_confusion_summed_over_both_ranks(tmp_path):
    cfg = validate(TrainConfig(epochs=2, checkpoint_every=1, num_workers=2, cpus_per_worker=1.0, warmup_epochs=0.5))
    history = run_ddp(cfg, tmp_path)
    assert history[-1]["val_acc"] > 0.7  # it learned (chance: 0.1)
    for metrics in history:
        state = load_checkpoint_file(str(tmp_path / f"checkpoint_epoch_{metrics['epoch']:04d}" / CHECKPOINT_FILE))
        confusion = state["confusion"]
        assert confusion.sum().item() == 359  # each validation image once, from whichever rank evaluated it
        assert confusion.trace().item() == round(metrics["val_acc"] * 359)
        assert metrics["val_acc"] <= metrics["val_top5"] <= 1.0
    rows = read_per_class_csv((tmp_path / "per_class.csv").read_text())[0]
    assert torch.equal(torch.tensor(rows), state["confusion"])  # the run's file: its last epoch's matrix
    # resumed from its last checkpoint with no epoch left: model_final.pt and per_class.csv from the checkpoint
    again = tmp_path / "again"
    run_ddp(cfg, again, resume_from=tmp_path / "checkpoint_epoch_0002")
    assert (again / "per_class.csv").read_text() == (tmp_path / "per_class.csv").read_text()


def test_above_the_matrix_limit_top_five_is_counted_and_no_matrix_kept(monkeypatch):
    import raydist.loop.evaluate as evaluate

    monkeypatch.setattr(evaluate, "MATRIX_CLASSES", 9)  # digits' 10 classes stand for 20,000
    (val,) = load_splits("digits", ("val",), device="cpu")
    sums = evaluate.evaluate_model(FixedRanking(), val, TrainConfig(), device=torch.device("cpu"))
    assert sums.confusion is None and sums.top5.item() == sum(int((val.labels == c).sum()) for c in RANKING[:5])


# ---- raydist.predict --per-class: a labelled folder -------------------------------------------------------------


def _labelled_folder(root):
    from PIL import Image

    for folder in ("cat", "dog", ".thumbnails", ""):  # two classes, a hidden folder, an image beside them
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / folder / f"{folder.strip('.') or 'loose'}.png")
    return root


def test_per_class_labels_are_the_class_subfolders_as_training_reads_a_folder(tmp_path):
    from raydist.errors import ConfigError
    from raydist.predict import image_files, image_labels

    root = _labelled_folder(tmp_path / "labelled")
    files = image_files([str(root), str(root / "cat")])  # the cat folder twice: its image once
    assert [os.path.relpath(f, root) for f in files] == [".thumbnails/thumbnails.png", "cat/cat.png",
                                                          "dog/dog.png", "loose.png"]
    assert image_labels([str(root)], files, ["dog", "cat"]) == [None, 1, 0, None]  # hidden, loose: not counted
    with pytest.raises(ConfigError, match=r"--per-class: .*labelled/dog is not a subfolder named for one of the "
                                          r"model's classes \(cat, fox\)"):
        image_labels([str(root)], files, ["cat", "fox"])
    cat = str(root / "cat")
    with pytest.raises(ConfigError, match="holds its images directly, not in subfolders named for the model's"):
        image_labels([cat], image_files([cat]), ["dog", "cat"])


def test_the_tally_writes_nothing_stale_and_no_matrix_above_the_limit(tmp_path, monkeypatch):
    import raydist.output.mistakes as mistakes
    from raydist.predict import LabelledTally

    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    tally = LabelledTally(2)
    tally.add(probs, [0, 1, None])
    assert tally.write(str(tmp_path), ["a", "b"], title="t").startswith("accuracy 100.00% on 2 labelled images;")
    assert read_per_class_csv((tmp_path / "per_class.csv").read_text()) == ([[1, 0], [0, 1]], ["a", "b"])
    assert LabelledTally(2).write(str(tmp_path), ["a", "b"], title="t") == \
        f"no labelled image could be decoded: nothing written to {tmp_path}"
    assert not (tmp_path / "per_class.csv").exists() and not (tmp_path / "confusion.png").exists()  # not stale
    monkeypatch.setattr(mistakes, "MATRIX_CLASSES", 1)
    big = LabelledTally(2)
    big.add(probs, [0, 0, 1])
    assert big.confusion is None
    assert big.write(str(tmp_path), ["a", "b"], title="t") == \
        "accuracy 33.33% on 3 labelled images; no per-class files above 1 classes"
    assert not (tmp_path / "per_class.csv").exists()


def test_the_train_commands_closing_summary_names_the_mistake_files_when_the_run_wrote_them(capsys):
    from raydist.ray_edge.fit import RunSummary
    from raydist.train import print_summary

    history = [{"epoch": 3, "val_acc": 0.99, "val_loss": 0.05, "stop_reason": ""}]
    wrote = RunSummary(run_dir="runs/r", history=history, final_model="runs/r/model_final.pt",
                       best_checkpoint=None, best_val_acc=None, seconds=1.0, confusion_picture="runs/r/confusion.png")
    print_summary(wrote)
    assert "mistakes:         runs/r/per_class.csv and runs/r/confusion.png" in capsys.readouterr().out.splitlines()
    print_summary(RunSummary(**{**wrote.__dict__, "confusion_picture": None}))  # diverged: none written
    assert "mistakes:" not in capsys.readouterr().out
