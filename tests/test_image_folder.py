"""The user's own images (--dataset folder): folders the tests write as real PNG and JPEG files from the
embedded digits; the layouts, the stratified split, decoding of awkward files, the node cache, every bad
folder refused in one line before Ray starts, and a real 2-worker run on the session cluster that learns,
saves its class names and is used by `python -m raydist.predict`."""

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from cli import without_ray_lines
import torch
from image_folders import write_awkward_files, write_digits_folder
from PIL import Image

from raydist import train as train_cli
from raydist.data.augment import Augmenter, augment_kind, centre_crop, random_resized_crop_flip
from raydist.config.fields import TrainConfig
from raydist.errors import FolderError, TooManyBadImages
from raydist.data.folder import decode_image, load_folder_split, scan_folder, stored_size
from raydist.data.sizes import classes_predicted, predicted_class_names
from raydist.preflight import validate


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYDIST_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    written = write_digits_folder(root)
    return root, written


# ---- layouts and the split ----------------------------------------------------------------------


def test_train_and_val_subfolders_are_the_splits_and_class_names_are_the_subfolder_names(split_folder):
    root, written = split_folder
    index = scan_folder(str(root), val_fraction=0.1)
    assert index.split_folders
    assert index.classes == [f"digit_{d}" for d in range(10)]
    assert (len(index.splits["train"]), len(index.splits["val"])) == (written["train"], written["val"])
    assert all(f.path.startswith("train/digit_") for f in index.splits["train"])
    assert all(index.classes[f.label] == f.path.split("/")[1] for f in index.splits["val"])


def test_without_split_folders_a_stratified_seeded_share_is_held_out_the_same_every_time(tmp_path):
    write_digits_folder(tmp_path / "flat", split_folders=False)
    index = scan_folder(str(tmp_path / "flat"), val_fraction=0.1)
    assert not index.split_folders
    train, val = index.counts("train"), index.counts("val")
    for n_train, n_val in zip(train, val):  # every class keeps its share: round(0.1 x its images)
        assert n_val == round(0.1 * (n_train + n_val))
    assert not {f.path for f in index.splits["train"]} & {f.path for f in index.splits["val"]}
    # Listed again in another order (a new scan, as on another node), the same files are held out.
    from raydist.data.folder import _scan

    _scan.cache_clear()
    again = scan_folder(str(tmp_path / "flat"), val_fraction=0.1)
    assert [f.path for f in again.splits["val"]] == [f.path for f in index.splits["val"]]


# ---- decoding -----------------------------------------------------------------------------------


def test_awkward_files_decode_to_rgb_or_are_skipped_and_named(tmp_path):
    write_digits_folder(tmp_path / "p", per_class=6)
    kinds = write_awkward_files(tmp_path / "p" / "train" / "digit_3")
    index = scan_folder(str(tmp_path / "p"), val_fraction=0.1)
    assert index.ignored == sorted(f"train/digit_3/{n}" for n, k in kinds.items() if k == "ignored")
    images, labels, report = load_folder_split(index, "train", stored=40)
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 40, 40)
    assert report.bad == ["train/digit_3/corrupt.jpg"]
    assert len(labels) == len(index.splits["train"]) - 1
    assert "skipped 1 unreadable image file(s): train/digit_3/corrupt.jpg" in report.line("train")
    # The 16-bit PNG keeps its top 8 bits (Pillow's own conversion would clip it to white).
    png16 = decode_image((tmp_path / "p/train/digit_3/grey16.png").read_bytes(), 32)
    png8 = decode_image((tmp_path / "p/train/digit_3/palette.png").read_bytes(), 32)
    assert png16.shape == (3, 32, 32) and png16.max() > 200 and png16.min() < 50
    assert np.abs(png16.astype(int) - png8.astype(int)).mean() < 8
    cmyk = decode_image((tmp_path / "p/train/digit_3/cmyk.jpg").read_bytes(), 32)
    assert cmyk.shape == (3, 32, 32)


def test_shorter_side_is_resized_to_the_stored_size_and_the_centre_kept(tmp_path):
    wide = np.zeros((60, 120, 3), dtype=np.uint8)
    wide[:, 30:90] = 255  # a white centre square between black sides
    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path)
    out = decode_image(path.read_bytes(), 30)
    assert out.shape == (3, 30, 30)
    # Only the centre square is left: white, but for the antialiasing's blend at the outermost columns.
    assert out[:, :, 1:-1].min() == 255 and out.min() > 128


def test_more_bad_files_than_allowed_stop_the_load_naming_the_first(tmp_path):
    write_digits_folder(tmp_path / "p", per_class=6)
    write_awkward_files(tmp_path / "p" / "train" / "digit_3")
    index = scan_folder(str(tmp_path / "p"), val_fraction=0.1)
    with pytest.raises(TooManyBadImages, match=r"1 of the train split's \d+ image files cannot be decoded "
                                                r"\(first: train/digit_3/corrupt.jpg\), more than --max-bad-images 0"):
        load_folder_split(index, "train", stored=32, max_bad=0)


def test_the_second_load_comes_from_the_cache_and_a_changed_file_decodes_again(tmp_path):
    write_digits_folder(tmp_path / "p", per_class=8)
    index = scan_folder(str(tmp_path / "p"), val_fraction=0.1)
    first, labels, report = load_folder_split(index, "val", stored=32)
    again, labels_again, cached = load_folder_split(index, "val", stored=32)
    assert not report.from_cache and cached.from_cache
    assert torch.equal(first, again) and torch.equal(labels, labels_again)
    victim = tmp_path / "p" / index.splits["val"][0].path
    Image.fromarray(np.full((32, 32), 7, dtype=np.uint8)).save(victim, format="PNG" if victim.suffix == ".png"
                                                               else "JPEG", quality=50)
    from raydist.data.folder import _scan

    _scan.cache_clear()
    changed = scan_folder(str(tmp_path / "p"), val_fraction=0.1)
    _, _, fresh = load_folder_split(changed, "val", stored=32)
    assert not fresh.from_cache


# ---- augmentation for photos --------------------------------------------------------------------


def test_resized_crop_takes_windows_of_the_image_resized_and_mirrors_about_half():
    images = torch.arange(40, dtype=torch.float32).repeat(40, 1).expand(64, 3, 40, 40).to(torch.uint8)  # x ramp
    out = random_resized_crop_flip(images, 32, torch.Generator().manual_seed(0))
    assert out.shape == (64, 3, 32, 32)
    assert out.min() >= 0 and out.max() <= 39  # bilinear inside the image: never outside its range
    rising = (out[:, 0, 16, -1] > out[:, 0, 16, 0]).float().mean().item()
    assert 0.3 < rising < 0.7  # a mirrored ramp falls
    widths = (out[:, 0, 16, :].max(1).values - out[:, 0, 16, :].min(1).values)
    assert widths.min() < 20 < widths.max()  # small and large windows (8-100% of the area)


def test_a_folder_evaluates_on_the_centre_crop_and_auto_trains_with_resized_crops(split_folder):
    root, _ = split_folder
    cfg = validate(TrainConfig(dataset="folder", data_dir=str(root), input_size=32))
    assert augment_kind(cfg.augment, cfg.dataset) == "resized_crop" and stored_size(32) == 37
    assert classes_predicted(cfg) == 10 and predicted_class_names(cfg)[:2] == ["digit_0", "digit_1"]
    from raydist.loop.evaluate import input_pipeline

    pipeline = input_pipeline(cfg, "cpu")
    images = torch.randint(0, 256, (4, 3, 37, 37), dtype=torch.uint8)
    evaluated = pipeline(images, train=False)
    expected = Augmenter("none", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))(centre_crop(images, 32),
                                                                                       train=False)
    assert torch.allclose(evaluated, expected)
    assert pipeline(images, train=True).shape == (4, 3, 32, 32)


# ---- bad folders: one line, exit 2, before Ray --------------------------------------------------


def _bad_folder(tmp_path, kind):
    root = tmp_path / kind
    if kind == "missing":
        return root
    if kind == "a file":
        root.write_text("not a folder")
        return root
    root.mkdir()
    if kind == "no class folders":
        Image.new("RGB", (8, 8)).save(root / "loose.png")
    elif kind == "one class":
        write_digits_folder(root, split_folders=False, per_class=3)
        for d in range(1, 10):
            for f in (root / f"digit_{d}").iterdir():
                f.unlink()
            (root / f"digit_{d}").rmdir()
    elif kind == "different classes":
        write_digits_folder(root, per_class=20)
        for f in (root / "val" / "digit_9").iterdir():
            f.unlink()
        (root / "val" / "digit_9").rmdir()
    elif kind == "a class without images":
        write_digits_folder(root, split_folders=False, per_class=3)
        (root / "empty_class").mkdir()
        (root / "empty_class" / "notes.txt").write_text("nothing")
    return root


@pytest.mark.parametrize("kind, message", [
    ("missing", "no such folder; give the folder that holds one subfolder per class"),
    ("a file", "is a file, not a folder"),
    ("empty", "the folder is empty"),
    ("no class folders", "the folder has no class subfolders"),
    ("one class", "has a single class (digit_0); a classifier needs at least 2 class subfolders"),
    ("different classes", "train/ and val/ hold different classes (only in train/: digit_9; only in val/: none)"),
    ("a class without images", "class folder empty_class holds no image file"),
])
def test_a_folder_that_cannot_be_a_data_set_is_one_line_exit_2(tmp_path, capsys, kind, message):
    root = _bad_folder(tmp_path, kind)
    code = train_cli.main(["--dataset", "folder", "--data-dir", str(root), "--storage-path", str(tmp_path / "runs")])
    err = without_ray_lines(capsys.readouterr().err).strip()
    assert code == 2 and "\n" not in err, err
    assert err.startswith(f"raydist.train: error: --data-dir {root}: ") and message in err, err
    assert not (tmp_path / "runs").exists()  # nothing written


def test_download_and_max_bad_images_are_checked_for_folders(split_folder, capsys, tmp_path):
    root, _ = split_folder
    assert train_cli.main(["--dataset", "folder", "--data-dir", str(root), "--download"]) == 2
    assert "an image folder is read as it is" in without_ray_lines(capsys.readouterr().err)
    assert train_cli.main(["--max-bad-images", "3"]) == 2
    assert "--max-bad-images 3 applies to --dataset folder only" in without_ray_lines(capsys.readouterr().err)
    assert train_cli.main(["--data-loader", "stream"]) == 2
    assert "--data-loader stream applies to --dataset folder only" in without_ray_lines(capsys.readouterr().err)
    cores = os.cpu_count() or 1  # a worker of 1 CPU per core leaves none to Ray Data's decoding
    assert train_cli.main(["--dataset", "folder", "--data-dir", str(root), "--data-loader", "stream", "--batch-size",
                           "8", "--num-workers", str(cores), "--storage-path", str(tmp_path / "runs")]) == 2
    err = without_ray_lines(capsys.readouterr().err).strip()
    assert err == (f"raydist.train: error: --data-loader stream: the streamed path decodes images on CPUs the workers "
                   f"leave free, but {cores} workers x --cpus-per-worker 1 take all {cores} CPUs of this machine; use "
                   f"a smaller --cpus-per-worker or fewer workers"), err
    assert not (tmp_path / "runs").exists()


def test_folder_errors_are_folder_errors():
    with pytest.raises(FolderError):
        scan_folder("/nonexistent/raydist-folder", val_fraction=0.1)


# ---- a real run: 2 workers, awkward files included; then predict ----------------------------------


@pytest.fixture(scope="module")
def folder_run(ray_cluster, split_folder, tmp_path_factory):
    root, _ = split_folder
    write_awkward_files(root / "train" / "digit_3")
    runs = tmp_path_factory.mktemp("runs")
    env = {**os.environ, "RAYDIST_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}
    # The digits' own augmentation (crop_flip) so that the bar is the one --dataset digits meets; the
    # default for folders (resized_crop) is tested above.
    result = subprocess.run([sys.executable, "-m", "raydist.train", "--address", ray_cluster, "--dataset", "folder",
                             "--data-dir", str(root), "--input-size", "32", "--augment", "crop_flip",
                             "--num-workers", "2", "--epochs", "10", "--storage-path", str(runs), "--name", "photos"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root, runs / "photos", result.stdout + result.stderr


def test_a_two_worker_run_on_a_folder_learns_as_digits_does_and_says_what_it_skipped(folder_run):
    from raydist.runs.checkpoints import FINAL_MODEL_FILE, load_checkpoint_file

    _, run_dir, output = folder_run
    final = load_checkpoint_file(str(run_dir / FINAL_MODEL_FILE))
    assert final["metrics"]["world_size"] == 2
    assert final["metrics"]["val_acc"] >= 0.90  # the bar of tests/test_ray_train.py's digits run
    assert "skipped 1 unreadable image file(s): train/digit_3/corrupt.jpg" in output
    assert re.search(r"ignored 3 file\(s\) not named as images: train/digit_3/.DS_Store", output)
    names = [f"digit_{d}" for d in range(10)]
    assert final["class_names"] == names
    assert json.loads((run_dir / "classes.json").read_text()) == names


def test_predict_classifies_held_out_images_at_the_runs_validation_accuracy(folder_run, tmp_path):
    from raydist.runs.checkpoints import FINAL_MODEL_FILE, load_checkpoint_file

    root, run_dir, _ = folder_run
    out_csv, report = tmp_path / "predictions.csv", tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "raydist.predict", str(run_dir), str(root / "val"), "--top-k", "2",
                             "--csv", str(out_csv), "--per-class", str(report)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(out_csv.open()))
    *lines, summary = result.stdout.strip().splitlines()
    assert len(rows) == len(lines) == sum(1 for _ in (root / "val").rglob("*.*"))
    assert re.fullmatch(r"\S+\tdigit_\d [\d.]+%, digit_\d [\d.]+%", lines[0])
    correct = sum(r["class_1"] == os.path.basename(os.path.dirname(r["path"])) for r in rows)
    reported = load_checkpoint_file(str(run_dir / FINAL_MODEL_FILE))["metrics"]["val_acc"]
    assert abs(correct / len(rows) - reported) <= 0.01
    # --per-class: the subfolders are the labels; the same counts as the per-image lines, per class
    assert summary.startswith(f"accuracy {correct / len(rows):.2%} on {len(rows)} labelled images, top-5 ")
    per_class = list(csv.DictReader((report / "per_class.csv").open()))
    assert [r["name"] for r in per_class] == [f"digit_{d}" for d in range(10)]
    assert sum(int(r["correct"]) for r in per_class) == correct
    assert all(int(r["images"]) == len(list((root / "val" / r["name"]).iterdir())) for r in per_class)
    assert (report / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_predict_per_class_refuses_a_subfolder_that_names_no_class_in_one_line_and_writes_nothing(folder_run,
                                                                                                   tmp_path):
    _, run_dir, _ = folder_run
    labelled = tmp_path / "labelled"
    (labelled / "digit_3").mkdir(parents=True)
    (labelled / "giraffe").mkdir()
    for folder in ("digit_3", "giraffe"):
        Image.new("RGB", (8, 8)).save(labelled / folder / "a.png")
    result = subprocess.run([sys.executable, "-m", "raydist.predict", str(run_dir), str(labelled), "--per-class",
                             str(tmp_path / "report")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and not result.stdout
    assert result.stderr.strip() == (f"raydist.predict: error: --per-class: {labelled / 'giraffe'} is not a "
                                     f"subfolder named for one of the model's classes (digit_0, digit_1, digit_2, "
                                     f"digit_3, digit_4, digit_5, digit_6, digit_7, digit_8, digit_9)")
    assert not (tmp_path / "report").exists()
    (tmp_path / "a_file").write_text("")
    (labelled / "giraffe" / "a.png").rename(labelled / "digit_3" / "b.png")
    (labelled / "giraffe").rmdir()
    result = subprocess.run([sys.executable, "-m", "raydist.predict", str(run_dir), str(labelled), "--per-class",
                             str(tmp_path / "a_file" / "report")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and not result.stdout  # the folder is made before any image is read
    assert result.stderr.strip().startswith(f"raydist.predict: error: --per-class {tmp_path / 'a_file' / 'report'}: "
                                            f"cannot be made a folder (")


def test_predict_refuses_a_missing_model_or_image_in_one_line(folder_run, tmp_path):
    _, run_dir, _ = folder_run
    for args, message in ([str(tmp_path / "nope"), "x.png"], "no such run folder or model file"), \
                         ([str(run_dir), str(tmp_path / "gone.jpg")], "no such image file or folder"):
        result = subprocess.run([sys.executable, "-m", "raydist.predict", *args], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 2 and message in result.stderr.strip() and \
            len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_on_a_gpu_auto_streams_a_folder_whose_copy_would_take_a_quarter_of_it_and_the_oom_line_names_it(
        split_folder, monkeypatch):
    """The memory path holds a decoded copy on every GPU: budgeted against the GPU's memory (a quarter of
    it), not only against the host's, and when the GPU runs out with such a copy on it the one line says so
    (not "lower the batch size")."""
    import types

    import torch

    from raydist.loop.recipe import out_of_memory_message
    from raydist.loop.worker_data import DEVICE_SHARE, folder_copy_bytes, streams_folder

    root, _ = split_folder
    cfg = validate(TrainConfig(dataset="folder", data_dir=str(root), input_size=32))
    copy = folder_copy_bytes(cfg)
    assert not streams_folder(cfg, workers_here=2)  # on this machine's host memory: held in memory
    assert not streams_folder(cfg, workers_here=2, device_bytes=int(copy / DEVICE_SHARE) + 1)
    assert streams_folder(cfg, workers_here=2, device_bytes=int(copy / DEVICE_SHARE) - 1)
    gpu = int(copy * 1.5)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=gpu))
    auto = out_of_memory_message(cfg, torch.device("cuda", 0), 2)  # auto streamed that folder: the batch's cause
    assert "per-worker batch of" in auto and "image folder" not in auto
    held = validate(TrainConfig(dataset="folder", data_dir=str(root), input_size=32, data_loader="memory"))
    assert not streams_folder(held, workers_here=2, device_bytes=copy)  # asked for: kept, and then ...
    line = out_of_memory_message(held, torch.device("cuda", 0), 2)
    assert line.startswith(f"out of memory on cuda training resnet8: the image folder held decoded on the GPU "
                           f"takes {copy / 2**30:.1f} GiB of its {gpu / 2**30:.1f} GiB; use --data-loader stream")
    small = out_of_memory_message(held, torch.device("cpu"), 2)  # on a CPU: the host budget's, as before
    assert "per-worker batch of" in small and "image folder" not in small


def test_a_folder_too_large_for_the_workers_memory_is_refused_before_ray(split_folder):
    from raydist.errors import ConfigError
    from raydist.run_config import check_folder_fits

    root, _ = split_folder
    cfg = TrainConfig(dataset="folder", data_dir=str(root), input_size=224, num_workers=2,
                      data_loader="memory")
    validate(cfg)
    index = scan_folder(str(root), val_fraction=0.1)
    per_worker = sum(len(files) for files in index.splits.values()) * 3 * 256 * 256  # stored at 256 for 224
    check_folder_fits(cfg, memory_bytes=4 * per_worker)  # two workers, half the memory: fits
    with pytest.raises(ConfigError, match=rf"--data-dir {re.escape(str(root))}: \d+ images stored at 256x256 pixels "
                                          r"take [\d.]+ GiB in each of the 2 workers, more than half of .*; use "
                                          r"--data-loader stream \(or auto\)"):
        check_folder_fits(cfg, memory_bytes=4 * per_worker - 1)
    # auto streams what does not fit, given CPUs for Ray Data's decoding beside the workers
    auto = validate(TrainConfig(dataset="folder", data_dir=str(root), input_size=224, num_workers=2))
    check_folder_fits(auto, memory_bytes=4 * per_worker - 1, cluster_cpus=3)
    with pytest.raises(ConfigError, match=r"--data-loader auto: the streamed path decodes images on CPUs the workers "
                                          r"leave free, but 2 workers x --cpus-per-worker 1 take all 2 CPUs"):
        check_folder_fits(auto, memory_bytes=4 * per_worker - 1, cluster_cpus=2)
    check_folder_fits(auto, memory_bytes=4 * per_worker, cluster_cpus=2)  # fits: held in memory, no check


# ---- the streamed path (Ray Data) ---------------------------------------------------------------


STREAM_SHARDS = """
import json, sys, ray, torch
from raydist.data.splits import shard_indices
from raydist.ray_edge.stream import StreamSource
from raydist.data.folder import scan_folder
ray.init(address=sys.argv[1], log_to_driver=False)
out = {}
for folder in ("clean", "awkward"):
    index = scan_folder(sys.argv[2] + "/" + folder, val_fraction=0.1)
    for split, train in (("train", True), ("val", False)):
        for rank in (0, 1):
            source = StreamSource(index, split, stored=37)
            batches = list(shard_indices(len(source), batch_size=64 if train else 128, rank=rank, world_size=2,
                                         epoch=3, seed=5, shuffle=train, pad=train, drop_last=train))
            got = list(source.batches(batches, train=train, shuffle_seed=1))
            wanted = sorted(index.splits[split][i].label for i in torch.cat(batches).tolist())
            out[f"{folder} {split} {rank}"] = {
                "sizes": [len(l) for _, l in got], "wanted_sizes": [len(b) for b in batches],
                "labels_match": sorted(torch.cat([l for _, l in got]).tolist()) == wanted,
                "shape": list(got[0][0].shape), "dtype": str(got[0][0].dtype), "bad": sorted(source.bad),
                "files": sorted(torch.cat(batches).tolist()), "total": len(source)}
from raydist.errors import TooManyBadImages
source = StreamSource(index, "train", stored=37, max_bad=0)  # the awkward folder, every file once
try:
    list(source.batches(list(shard_indices(len(source), batch_size=16, rank=0, world_size=1, shuffle=False,
                                           drop_last=False, pad=False)), train=False))
    out["stopped"] = ""
except TooManyBadImages as exc:
    out["stopped"] = str(exc)
print(json.dumps(out))
"""


def test_streamed_shards_hold_this_ranks_files_in_equal_steps_and_validation_counts_each_image_once(
        ray_cluster, tmp_path):
    write_digits_folder(tmp_path / "clean", per_class=60)
    write_digits_folder(tmp_path / "awkward", per_class=60)
    write_awkward_files(tmp_path / "awkward" / "train" / "digit_3")
    result = subprocess.run([sys.executable, "-c", STREAM_SHARDS, ray_cluster, str(tmp_path)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert re.search(r"1 of the train split's \d+ image files cannot be decoded \(first: train/digit_3/corrupt.jpg\), "
                     r"more than --max-bad-images 0 allows", out.pop("stopped"))
    for key, shard in out.items():
        assert shard["sizes"] == shard["wanted_sizes"], key  # full batches, the same steps as the memory path
        assert shard["shape"][1:] == [3, 37, 37] and shard["dtype"] == "torch.uint8"
        if key.startswith("clean"):
            assert shard["labels_match"] and not shard["bad"], key  # exactly this rank's files
    train0, train1 = out["clean train 0"], out["clean train 1"]
    assert len(train0["sizes"]) == len(train1["sizes"]) >= 3  # DDP: the same number of steps on every rank
    assert len(set(train0["files"]) & set(train1["files"])) <= 1  # disjoint, but for one padding duplicate
    assert len(set(train0["files"]) | set(train1["files"])) > train0["total"] - 2 * 64  # each drops < a batch
    val = out["clean val 0"]["files"] + out["clean val 1"]["files"]
    assert sorted(val) == list(range(out["clean val 0"]["total"]))  # every validation image exactly once
    assert sum(out["clean val 0"]["sizes"]) + sum(out["clean val 1"]["sizes"]) == out["clean val 0"]["total"]
    # The corrupt JPEG is named by the rank whose batches hold it (if the epoch's draw kept it), and that
    # batch was topped up to full size (checked above).
    files = scan_folder(str(tmp_path / "awkward"), val_fraction=0.1).splits["train"]
    corrupt = next(i for i, f in enumerate(files) if f.path.endswith("corrupt.jpg"))
    for rank in (0, 1):
        shard = out[f"awkward train {rank}"]
        assert shard["bad"] == (["train/digit_3/corrupt.jpg"] if corrupt in shard["files"] else []), rank
    assert any(corrupt in out[f"awkward train {rank}"]["files"] for rank in (0, 1))  # this draw keeps it


# One trial holds the folder in memory, the other streams it through Ray Data, both in the trial's own
# process; one at a time, so that the streamed trial's decode tasks find the CPU its worker leaves free. The
# memory trial trains 6 epochs (the exported winner); the streamed one 2, to its end: what it proves is that
# an in-process trial streams (each streamed epoch costs seconds of Ray Data here).
FOLDER_STUDY = """
num_samples: 2
max_concurrent: 1
search: {algorithm: random, seed: 0}
scheduler: {type: fifo}
fixed: {dataset: folder, model: resnet8, num_workers: 1, warmup_epochs: 0.5, input_size: 32, augment: crop_flip}
searched:
  lr: {choice: [0.4, 0.8]}
  data_loader: {choice: [memory, stream]}
  epochs: {choice: [2, 6]}
points_to_evaluate:
  - {lr: 0.8, data_loader: memory, epochs: 6}
  - {lr: 0.8, data_loader: stream, epochs: 2}
"""


def test_a_study_on_a_folder_exports_a_best_model_with_its_class_names_that_predict_uses(ray_cluster, split_folder,
                                                                                        tmp_path):
    from conftest import read_csv, start_tune

    from raydist.runs.checkpoints import load_checkpoint_file

    root, _ = split_folder
    (tmp_path / "folder.yaml").write_text(FOLDER_STUDY)
    proc = start_tune(ray_cluster, "--search-space", str(tmp_path / "folder.yaml"), "--set", f"data_dir={root}",
                      "--storage-path", str(tmp_path / "runs"), "--name", "photos-study",
                      env={**os.environ, "RAYDIST_CACHE_DIR": str(tmp_path / "cache")})
    stdout, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, stdout[-4000:]
    experiment = tmp_path / "runs" / "photos-study"
    rows = read_csv(experiment / "results.csv")
    assert len(rows) == 2 and max(float(r["best_val_acc"]) for r in rows) >= 0.85
    # both paths ran in-process trials to their end (a streamed one could not: no Ray Data stream was wired)
    assert {(r["data_loader"], r["status"], r["epochs_run"]) for r in rows} == {("memory", "finished", "6"),
                                                                             ("stream", "finished", "2")}
    best = load_checkpoint_file(str(experiment / "best_model.pt"))
    assert best["class_names"] == [f"digit_{d}" for d in range(10)]
    result = subprocess.run([sys.executable, "-m", "raydist.predict", str(experiment), str(root / "val" / "digit_7")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert sum(line.endswith("%") and "\tdigit_7 " in line for line in lines) >= 0.8 * len(lines)
