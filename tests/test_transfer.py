"""Transfer learning: where weights come from, how the model is adapted, and each fine-tuning variant.

The DDP tests run raydist's real worker loop as 2 gloo processes (tests/local_ddp.py) with augmentation
on. The source model is a real raydist run: resnet8 trained on digits 0-4, fine-tuned on digits 5-9 with
20 labelled images per class (the offline transfer task of docs/benchmarks.md).
"""

import os
import pickle

import pytest
import torch
from conftest import digits_val_accuracy
from local_ddp import run_ddp

from raydist.errors import ConfigError
from raydist.config.fields import TrainConfig
from raydist.runs.checkpoints import CHECKPOINT_FILE, FINAL_MODEL_FILE, final_model_bytes
from raydist.loop.context import local_context
from raydist.loop.run import run
from raydist.models.registry import MODELS, create_model
from raydist.errors import WeightsError
from raydist.models.transfer import (backbone_stages, build_model, first_conv, pretrained_source, read_weights_file,
                                     transfer_units)
from raydist.preflight import validate

TARGET = dict(dataset="digits", classes="5-9", train_per_class=20, num_workers=2, cpus_per_worker=1.0,
              batch_size=10, lr=1.0, warmup_epochs=0.5, augment="crop_flip", checkpoint_every=1)
LEARNED = 0.35  # validation accuracy on digits 5-9 after a few epochs on 100 images (chance: 0.2)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A raydist run on digits 0-4 (the source task): its folder, holding model_final.pt and checkpoints."""
    folder = tmp_path_factory.mktemp("source")
    cfg = TrainConfig(dataset="digits", classes="0-4", epochs=8, num_workers=1, cpus_per_worker=2.0,
                      batch_size=32, lr=0.4, warmup_epochs=0.5)
    validate(cfg)
    history = run(cfg, local_context(str(folder)))
    assert history[-1]["val_acc"] > 0.9  # it learned its 5 classes (chance: 0.2)
    return folder


def _final(folder):
    return torch.load(os.path.join(folder, FINAL_MODEL_FILE), weights_only=True)


def _backbone(state):
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


# ---- where the weights come from ------------------------------------------------------------------------


def _seed_torchvision_cache(root) -> dict:
    """A ResNet-18 weights file where torchvision's weights API looks ($TORCH_HOME/hub/checkpoints)."""
    import torchvision

    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None).state_dict()
    # as in many published files: no BatchNorm step counters (PyTorch fills them in)
    reference = {k: v for k, v in reference.items() if not k.endswith("num_batches_tracked")}
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    target = root / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    target.parent.mkdir(parents=True)
    torch.save(reference, target)
    return reference


def test_pretrained_comes_through_torchvisions_weights_api_from_its_cache(tmp_path, monkeypatch):
    reference = _seed_torchvision_cache(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    source = pretrained_source("resnet18_imagenet")
    net = build_model("resnet18_imagenet", num_classes=7, source=source)
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in _backbone(reference).items())  # bit for bit
    # a new head for 7 classes, initialised as the notebook does: Xavier-uniform weights, U(+-1/sqrt(n)) bias
    assert net.fc.weight.shape == (7, 512)
    assert net.fc.weight.abs().max() <= (6 / (512 + 7)) ** 0.5
    assert net.fc.bias.abs().max() <= 1 / 512 ** 0.5 and net.fc.bias.std() > 0


def test_weights_files_of_every_accepted_kind_load_bit_for_bit(tmp_path, source_run):
    final = _final(source_run)
    checkpoint = next(source_run.glob("checkpoint_epoch_*/" + CHECKPOINT_FILE))
    plain = tmp_path / "plain.pth"
    torch.save(final["model"], plain)
    wrapped = tmp_path / "ddp.pth"  # saved from a DDP-wrapped model
    torch.save({f"module.{k}": v for k, v in final["model"].items()}, wrapped)
    best = tmp_path / "best_model.pt"  # a study's export: the final-model format with the trial's details
    best.write_bytes(final_model_bytes(final["model"], final["config"], final["metrics"], trial_id="t1",
                                       checkpoint="somewhere", epoch=4, best_epoch=4))
    kinds = {"model_final.pt": source_run / FINAL_MODEL_FILE, "checkpoint.pt": checkpoint, "best_model.pt": best,
             "state dict": plain, "DDP state dict": wrapped}
    for kind, path in kinds.items():
        expected = torch.load(path, weights_only=True)
        expected = _backbone({k.removeprefix("module."): v for k, v in expected.get("model", expected).items()})
        net = build_model("resnet8", num_classes=3, source=read_weights_file(str(path)))
        loaded = net.state_dict()
        assert expected.keys() == _backbone(loaded).keys(), kind
        assert all(torch.equal(loaded[k], v) for k, v in expected.items()), kind
        assert net.fc.out_features == 3


def test_a_torchvision_weights_file_loads_as_weights(tmp_path):
    reference = _seed_torchvision_cache(tmp_path)
    path = next((tmp_path / "hub" / "checkpoints").iterdir())
    net = build_model("resnet18_imagenet", num_classes=10, source=read_weights_file(str(path)))
    assert all(torch.equal(net.state_dict()[k], v) for k, v in _backbone(reference).items())


class Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/raydist-should-not-exist",))


@pytest.mark.parametrize("case", ["missing", "folder", "garbage", "pickled code", "no tensors", "wrong model"])
def test_weights_that_cannot_be_used_are_refused_in_one_line(tmp_path, source_run, case):
    path = tmp_path / "w.pt"
    if case == "folder":
        path = tmp_path
    elif case == "garbage":
        path.write_bytes(b"not a torch file")
    elif case == "pickled code":
        path.write_bytes(pickle.dumps({"model": Boom()}))
    elif case == "no tensors":
        torch.save({"lr": 0.1}, path)
    elif case == "wrong model":
        path = source_run / FINAL_MODEL_FILE
    with pytest.raises(WeightsError) as info:
        build_model("resnet18_imagenet", num_classes=5, source=read_weights_file(str(path)))
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    expected = {"missing": "no such file", "folder": "is a folder", "garbage": "not a readable PyTorch weights file",
                "pickled code": "not a readable PyTorch weights file", "no tensors": "holds no state dict",
                "wrong model": "does not fit --model resnet18_imagenet"}[case]
    assert expected in message
    if case == "wrong model":  # names the first mismatching tensors, and the model the file holds
        assert "missing, first conv1.weight" in message and "use --model resnet8" in message
    assert not os.path.exists("/tmp/raydist-should-not-exist")


def test_shape_mismatches_name_the_tensors_and_both_shapes(tmp_path):
    state = create_model("resnet18_imagenet", num_classes=10).state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 5, 5)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"layer1\.0\.conv1\.weight \(64, 64, 5, 5\) vs the model's \(64, 64, 3, 3\)"):
        build_model("resnet18_imagenet", num_classes=10, source=read_weights_file(str(path)))


def test_pretrained_weights_neither_cached_nor_downloadable_say_which_file_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # no download, with or without internet
    with pytest.raises(WeightsError) as info:
        pretrained_source("resnet18_imagenet")
    message = str(info.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "--weights FILE" in message and "\n" not in message


# ---- adapting the network -------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["resnet18_imagenet", "resnet8", "wrn_dli"])
def test_summed_stem_on_one_channel_equals_the_original_on_the_image_replicated_to_rgb(tmp_path, model):
    torch.manual_seed(0)
    original = create_model(model, num_classes=10).eval()
    path = tmp_path / "w.pth"
    torch.save(original.state_dict(), path)
    adapted = build_model(model, num_classes=10, grey_input="sum", source=read_weights_file(str(path))).eval()
    adapted.fc.load_state_dict(original.fc.state_dict())  # the head is new by design; compare the rest
    assert first_conv(adapted)[1].in_channels == 1
    grey = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(adapted(grey), original(grey.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)


def test_a_grey_stem_source_loads_into_a_replicating_model_with_the_same_output(tmp_path):
    torch.manual_seed(0)
    grey = build_model("resnet8", num_classes=10, grey_input="sum").eval()
    path = tmp_path / "grey.pth"
    torch.save(grey.state_dict(), path)
    rgb = build_model("resnet8", num_classes=10, source=read_weights_file(str(path))).eval()
    rgb.fc.load_state_dict(grey.fc.state_dict())
    image = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rgb(image.expand(-1, 3, -1, -1)), grey(image), rtol=1e-4, atol=1e-5)


def test_reinit_stem_is_new_and_trains_with_the_head(tmp_path, source_run):
    source = read_weights_file(str(source_run / FINAL_MODEL_FILE))
    net = build_model("resnet8", num_classes=5, grey_input="reinit", source=source)
    assert first_conv(net)[1].weight.shape == (16, 1, 3, 3)
    units = transfer_units(net, new_stem=True)
    assert [u.name for u in units] == ["fc+stem", "stage3", "stage2", "stage1"] and units[0].new


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_model_names_its_stages_and_every_parameter_is_in_exactly_one_unit(model):
    net = create_model(model, num_classes=10)
    units = transfer_units(net, new_stem=False)
    ids = [id(p) for u in units for p in u.params]
    assert len(ids) == len(set(ids)) == len(list(net.parameters()))
    assert units[0].name == "fc" and [u.name for u in units][-1] == "stem" == backbone_stages(net)[0][0]
    assert len(units) >= 4


# ---- the run-level options ------------------------------------------------------------------------------


@pytest.mark.parametrize("values, message", [
    (dict(finetune="linear"), "--finetune linear freezes pretrained layers, but this run starts from scratch"),
    (dict(backbone_lr_mult=0.1), "--backbone-lr-mult 0.1 sets a pretrained backbone's LR"),
    (dict(weights="w.pt", pretrained=True, model="resnet18_imagenet"), "--pretrained and --weights w.pt both"),
    (dict(weights="w.pt", finetune="gradual", unfreeze_every=5, epochs=5), "--unfreeze-every 5 with --epochs 5"),
    (dict(weights="w.pt", finetune="lp-ft", freeze_epochs=3, epochs=2), "--freeze-epochs 3 with --epochs 2"),
    (dict(grey_input="sum", dataset="cifar10"), "--grey-input sum feeds grey images as one channel; cifar10 is"),
    (dict(input_size=4), "--input-size 4 must be between 8 and 1024"),
    (dict(classes="0-10"), "--classes '0-10': class 10 is outside 0-9"),
    (dict(classes="3"), "--classes '3': a classifier needs at least 2 classes"),
    (dict(classes="1,1,2"), "a class is named twice"),
    (dict(classes="a-b"), "'a-b' is neither a class number nor a range"),
    (dict(train_fraction=1.5), "--train-fraction must be in (0, 1]"),
    (dict(train_fraction=0.5, train_per_class=10), "both shrink the training set"),
    (dict(train_per_class=0), "--train-per-class must be positive"),
    (dict(dataset="fake", classes="0-3"), "fake data has --fake-num-classes"),
    (dict(classes="0-1", train_per_class=20, batch_size=32), "--batch-size 32 x --num-workers 2 = 64 images per "
                                                             "step, but digits has 40 training images"),
])
def test_transfer_and_data_options_are_checked_before_anything_starts(values, message):
    with pytest.raises(ConfigError) as info:
        validate(TrainConfig(**values))
    assert message in str(info.value)


# ---- fine-tuning variants under 2-worker DDP -------------------------------------------------------------


def _unit_of_each_param(state: dict) -> dict[int, str]:
    """Optimizer parameter index -> unit name, from a checkpoint's optimizer groups."""
    return {index: group["unit"] for group in state["optimizer"]["param_groups"] for index in group["params"]}


def test_linear_probe_changes_the_head_only_and_keeps_no_state_for_frozen_tensors(tmp_path, source_run):
    weights = str(source_run / FINAL_MODEL_FILE)
    cfg = validate(TrainConfig(weights=weights, finetune="linear", epochs=3, **{**TARGET, "lr": 2.0}))
    history = run_ddp(cfg, tmp_path)
    assert history[-1]["val_acc"] > LEARNED
    source = _final(source_run)["model"]
    final = torch.load(tmp_path / FINAL_MODEL_FILE, weights_only=True)["model"]
    # every backbone tensor, BatchNorm running statistics included, is the source's bit for bit
    assert all(torch.equal(final[k], v) for k, v in _backbone(source).items())
    torch.manual_seed(cfg.seed)  # as the loop does before building the model
    start = build_model("resnet8", num_classes=5, source=read_weights_file(weights))  # the head it started from
    assert not torch.equal(final["fc.weight"], start.fc.weight.detach())
    state = torch.load(tmp_path / "checkpoint_epoch_0003" / CHECKPOINT_FILE, weights_only=True)
    units = _unit_of_each_param(state)
    assert set(state["optimizer"]["state"]) == {i for i, unit in units.items() if unit == "fc"}
    assert {m["trainable_params"] for m in history} == {64 * 5 + 5}


def test_gradual_unfreezes_one_stage_per_epoch_and_a_resume_lands_in_the_right_stage(tmp_path, source_run):
    cfg = TrainConfig(weights=str(source_run / FINAL_MODEL_FILE), finetune="gradual", unfreeze_every=1,
                      epochs=4, **TARGET)
    validate(cfg)
    full = run_ddp(cfg, tmp_path / "full")
    net = build_model("resnet8", num_classes=5)
    sizes = {name: sum(p.numel() for p in params) for name, params, _ in backbone_stages(net)}
    head = 64 * 5 + 5
    expected = [head, head + sizes["stage3"], head + sizes["stage3"] + sizes["stage2"],
                head + sizes["stage3"] + sizes["stage2"] + sizes["stage1"]]
    assert [m["trainable_params"] for m in full] == expected
    assert full[-1]["val_acc"] > LEARNED
    # resumed after epoch 2: epochs 3 and 4 run in stages 2 and 3, exactly as the uninterrupted run did
    resumed = run_ddp(cfg, tmp_path / "resumed", resume_from=tmp_path / "full" / "checkpoint_epoch_0002")
    assert [m["trainable_params"] for m in resumed] == expected[2:]
    assert [m["val_loss"] for m in resumed] == [m["val_loss"] for m in full[2:]]
    a = torch.load(tmp_path / "full" / FINAL_MODEL_FILE, weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / FINAL_MODEL_FILE, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("variant", [
    dict(finetune="full"),
    dict(finetune="lp-ft", freeze_epochs=1),
    dict(finetune="full", backbone_lr_mult=0.1),
    dict(finetune="full", grey_input="sum", input_size=32),  # twice the side the source was trained at
], ids=["full", "lp-ft", "full-backbone-lr-0.1", "full-grey-sum-input-32"])
def test_each_variant_trains_under_2_worker_ddp_and_reports_its_saved_models_accuracy(tmp_path, source_run, variant):
    # 6 epochs (30 updates): at 3 the val accuracy of these 100-image runs still swung by 15 points from
    # epoch to epoch (BatchNorm statistics settling), and one CPU's rounding put a variant under the bar.
    cfg = validate(TrainConfig(weights=str(source_run / FINAL_MODEL_FILE), epochs=6, **{**TARGET, **variant}))
    history = run_ddp(cfg, tmp_path)
    assert history[-1]["val_acc"] > LEARNED
    final = torch.load(tmp_path / FINAL_MODEL_FILE, weights_only=True)
    assert digits_val_accuracy(final) == pytest.approx(history[-1]["val_acc"], abs=1e-6)
    state = torch.load(tmp_path / "checkpoint_epoch_0003" / CHECKPOINT_FILE, weights_only=True)
    lrs = {g["unit"]: g["lr"] for g in state["optimizer"]["param_groups"]}
    mult = cfg.backbone_lr_mult or (0.1 if cfg.finetune == "lp-ft" else 1.0)
    assert lrs["stage1"] == pytest.approx(lrs["fc"] * mult)
    if cfg.finetune == "lp-ft":  # the probe epoch trains the head only, then everything
        assert history[0]["trainable_params"] < history[1]["trainable_params"] == history[2]["trainable_params"]


@pytest.mark.slow
def test_gradual_unfreezing_with_torch_compile_compiles_every_stage_and_never_falls_back(tmp_path, source_run,
                                                                                         monkeypatch):
    """Every new trainable set recompiles the model's training and evaluation graphs (requires_grad and the
    frozen BatchNorm layers' mode are among compile's guards): a 6-epoch run of resnet8's 5 stages asks for
    more than torch's default 8 recompiles of one function, after which torch would run the last stages
    uncompiled with a warning only. Here hitting the limit fails the run. Dynamo's guards and limits are the
    same whatever compiles the graphs: the eager backend stands in for inductor (whose CPU compile is the
    cost of test_ddp_exact's compile test) to keep this one to seconds. One worker in this process."""
    import functools

    import torch._dynamo

    graphs = []

    def counting_eager(graph_module, example_inputs):  # what the eager backend does, each graph counted
        graphs.append(graph_module)
        return graph_module.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting_eager))
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    torch._dynamo.reset()
    cfg = TrainConfig(weights=str(source_run / FINAL_MODEL_FILE), finetune="gradual", compile=True, epochs=6,
                      **{**TARGET, "num_workers": 1, "cpus_per_worker": 2.0, "batch_size": 20})
    validate(cfg)
    history = run(cfg, local_context(str(tmp_path)))
    trainable = [m["trainable_params"] for m in history]
    assert trainable == sorted(trainable) and len(set(trainable)) == 5  # the head, then one stage more a epoch
    assert len(history) == 6 and max(m["val_acc"] for m in history) > LEARNED
    # Each of the 5 stages compiled its own training and evaluation graphs (a stage that fell back to eager
    # compiles none): more than the 8 one function may have without the per-stage reset.
    assert len(graphs) >= 2 * 5, len(graphs)
    final = torch.load(tmp_path / FINAL_MODEL_FILE, weights_only=True)
    assert digits_val_accuracy(final) == pytest.approx(history[-1]["val_acc"], abs=1e-6)
    torch._dynamo.reset()


def test_a_file_the_driver_could_not_check_that_does_not_fit_is_the_workers_one_line_cause(tmp_path, source_run):
    """On a cluster joined with --address the driver may not see the file: the workers check it."""
    from raydist.errors import WorkerInputError

    cfg = TrainConfig(model="wrn_dli", weights=str(source_run / FINAL_MODEL_FILE), epochs=1,
                      **{**TARGET, "num_workers": 1})
    validate(cfg)
    with pytest.raises(WorkerInputError, match=r"does not fit --model wrn_dli: .* \(on node local\)$"):
        run(cfg, local_context(str(tmp_path)))


def test_a_checkpoint_whose_optimizer_layout_differs_is_refused_in_one_line(tmp_path, source_run):
    """A run from scratch keeps one group pair; a transfer run one per unit: loading one into the other
    (a --pretrained checkpoint saved by an earlier raydist) says so instead of a traceback."""
    from raydist.errors import WorkerInputError
    from raydist.runs.checkpoints import load_checkpoint_file

    scratch = validate(TrainConfig(epochs=1, **{**TARGET, "num_workers": 1}))
    run(scratch, local_context(str(tmp_path / "scratch")))
    state = load_checkpoint_file(str(tmp_path / "scratch" / "checkpoint_epoch_0001" / CHECKPOINT_FILE))
    transfer = TrainConfig(weights=str(source_run / FINAL_MODEL_FILE), epochs=2, **{**TARGET, "num_workers": 1})
    with pytest.raises(WorkerInputError, match="optimizer has 2 parameter groups, this run's 10 .* --weights"):
        run(validate(transfer), local_context(str(tmp_path / "resumed"), resume_state=state))


def test_a_study_checks_every_model_and_weights_file_its_trials_can_get(tmp_path, source_run, monkeypatch):
    from raydist.tune import parse_args

    study = tmp_path / "s.yaml"
    study.write_text("num_samples: 2\nsearch: {algorithm: random}\nscheduler: {type: fifo}\n"
                     "fixed: {dataset: digits, classes: 5-9, epochs: 2, num_workers: 1}\n"
                     "searched:\n  weights: {choice: [source.pt, copy.pt]}\n")
    monkeypatch.chdir(source_run)
    (source_run / "source.pt").write_bytes((source_run / FINAL_MODEL_FILE).read_bytes())
    with pytest.raises(ConfigError, match="copy.pt: no such file"):  # every choice is checked
        parse_args(["--search-space", str(study), "--storage-path", str(tmp_path / "runs")])
    (source_run / "copy.pt").write_bytes((source_run / FINAL_MODEL_FILE).read_bytes())
    plan = parse_args(["--search-space", str(study), "--storage-path", str(tmp_path / "runs")])
    # relative choices are made absolute: a trial runs in a working folder of its own
    assert plan.study.searched["weights"].args == (str(source_run / "source.pt"), str(source_run / "copy.pt"))
    study.write_text("num_samples: 2\nsearch: {algorithm: random}\nscheduler: {type: fifo}\n"
                     "fixed: {dataset: digits, classes: 5-9, epochs: 2, num_workers: 1, weights: source.pt}\n"
                     "searched:\n  model: {choice: [resnet8, wrn_dli]}\n")
    with pytest.raises(ConfigError, match="does not fit --model wrn_dli"):  # each searched model against the file
        parse_args(["--search-space", str(study), "--storage-path", str(tmp_path / "runs")])
