"""Model parallelism (raydist.parallel.pipeline, --model-parallel K --micro-batches M) on the CPU.

Every model that defines pipeline units (every registered one) is split into K = 2 and 3 stages with M = 1,
2 and 4 micro-batches, all stages on the CPU: in eval mode the split model gives the unsplit model's logits
and gradients; in train mode it is the unsplit model fed the micro-batches one after another (BatchNorm
normalises each micro-batch by itself, as in GPipe), down to the BatchNorm running statistics. Then the
balanced split, the errors, and a 2-worker gloo DDP run of raydist's real loop over the split model.
"""

import copy
import itertools
import random

import pytest
import torch
from conftest import digits_val_accuracy
from local_ddp import run_ddp

from raydist.errors import ConfigError
from raydist.config.fields import TrainConfig
from raydist.runs.checkpoints import FINAL_MODEL_FILE, load_checkpoint_file
from raydist.models.registry import MODELS, create_model
from raydist.parallel.pipeline import (Pipeline, balanced_stage_sizes, measured_seconds, models_with_units,
                                       pipeline_units, stage_devices, unit_costs)
from raydist.preflight import validate

CPU = torch.device("cpu")
SPLITS = [(k, m) for k in (2, 3) for m in (1, 2, 4)]  # (stages, micro-batches)
# The four largest models: both stage counts (where a model is cut is what differs between models), each
# with micro-batches; the pipeline's micro-batching (M = 1, 2, 4 at each K) is the same code for every model
# and runs in full on the others. All six splits of these four took 53 s of the suite's in-process tier.
LARGE = {"resnet50", "resnet50_imagenet", "wrn28_10", "wrn_dli"}
LARGE_SPLITS = [(2, 2), (3, 4)]
BATCH = 8
# Input sides that keep each model to a few seconds here (default 32; the ImageNet ResNets' last BatchNorm
# then sees a 1x1 map, over the 2 images of a micro-batch); wrn_dli at 28 (its AvgPool2d(7) needs a map of 7).
SIDES = {"resnet18": 16, "resnet50": 16, "wrn28_10": 16, "wrn_dli": 28}


def _model(name: str) -> torch.nn.Module:
    """The model with non-trivial BatchNorm statistics (so eval mode checks them too) and no dropout (its
    masks are drawn in the pipeline's order, so they match the unsplit model's in distribution only)."""
    torch.manual_seed(0)
    args = {"dropout": 0.0} if "dropout" in MODELS[name].arguments() else {}
    net = create_model(name, num_classes=10, **args)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return net


def _inputs(name: str):
    side = SIDES.get(name, 32)
    generator = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3, side, side, generator=generator), torch.randn(BATCH, 10, generator=generator)


def _splits(name: str) -> list:
    return LARGE_SPLITS if name in LARGE else SPLITS


def _split(net, stages: int, micro_batches: int) -> Pipeline:
    units = pipeline_units(net)
    return Pipeline(units, costs=unit_costs(units, balance="params"), devices=[CPU] * stages,
                    micro_batches=micro_batches)


def _assert_near(actual, expected, what, rel=2e-5):
    """Equal to float rounding: every element within `rel` of the tensor's largest magnitude."""
    scale = expected.abs().max().clamp_min(1e-12)
    error = ((actual - expected).abs().max() / scale).item()
    assert error <= rel, f"{what}: off by {error:.2g} of its largest element"


def _grads(net) -> dict:
    return {name: p.grad for name, p in net.named_parameters()}


def test_every_registered_model_defines_units_and_they_cover_it():
    assert models_with_units() == sorted(MODELS)
    for name in MODELS:
        with torch.device("meta"):
            net = create_model(name, num_classes=10)
        units = pipeline_units(net)
        assert units[-1][0] == "head" and len(units) >= 5, name
        # The units are the model's own modules: the same parameter objects, none left out.
        unit_params = {id(p) for _, m in units for p in m.parameters()}
        assert unit_params == {id(p) for p in net.parameters()}, name


@pytest.mark.parametrize("name", models_with_units())
def test_in_eval_mode_the_split_model_gives_the_unsplit_logits_and_gradients(name):
    base = _model(name).eval()
    x, weights = _inputs(name)
    reference = copy.deepcopy(base)
    logits = reference(x)
    (logits * weights).sum().backward()  # a loss that weighs every logit differently
    for stages, micro in _splits(name):
        net = copy.deepcopy(base)
        pipe = _split(net, stages, micro).eval()
        split_logits = pipe(x)
        (split_logits * weights).sum().backward()
        _assert_near(split_logits, logits, f"{name} K={stages} M={micro} logits")
        for pname, grad in _grads(reference).items():
            _assert_near(_grads(net)[pname], grad, f"{name} K={stages} M={micro} grad of {pname}")
        # state dict keys unchanged: the split model's weights load into (and come from) the unsplit model
        assert list(net.state_dict()) == list(base.state_dict())


@pytest.mark.parametrize("name", models_with_units())
def test_in_train_mode_the_split_model_is_the_unsplit_model_fed_the_micro_batches_in_turn(name):
    base = _model(name).train()
    x, weights = _inputs(name)
    for stages, micro in _splits(name):
        reference, net = copy.deepcopy(base), copy.deepcopy(base)
        logits = torch.cat([reference(part) for part in x.tensor_split(micro)])
        (logits * weights).sum().backward()
        split_logits = _split(net, stages, micro)(x)
        (split_logits * weights).sum().backward()
        what = f"{name} K={stages} M={micro}"
        _assert_near(split_logits, logits, f"{what} logits")
        for pname, grad in _grads(reference).items():
            _assert_near(_grads(net)[pname], grad, f"{what} grad of {pname}")
        buffers = dict(net.named_buffers())
        for bname, buffer in reference.named_buffers():  # running statistics, updated once per micro-batch
            _assert_near(buffers[bname].double(), buffer.double(), f"{what} {bname}")
    # ... and not the unsplit model fed the whole batch, where the model has BatchNorm (the last split: M=4)
    if any(isinstance(m, torch.nn.BatchNorm2d) for m in base.modules()):
        assert (copy.deepcopy(base)(x) - split_logits).abs().max() > 1e-3


@pytest.mark.parametrize("name, grey_input", [("resnet18_imagenet", "sum"), ("resnet8", "reinit")])
def test_the_units_of_a_model_with_an_adapted_grey_stem_are_its_modules_after_the_adaptation(name, grey_input):
    from raydist.models.transfer import build_model

    torch.manual_seed(0)
    net = build_model(name, num_classes=5, grey_input=grey_input).eval()
    pipe = _split(copy.deepcopy(net), 2, 2).eval()
    assert pipe.stages[0][0][0].in_channels == 1  # the stem's new 1-channel conv
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        _assert_near(pipe(x), net(x), f"{name} with a {grey_input} grey stem")
    assert stage_devices(CPU, 3) == [CPU] * 3  # on the CPU every stage runs there (a test of the split)


def test_the_stages_go_on_the_gpus_the_worker_holds_whatever_their_ids():
    # Ray Train lets the workers of a node see each other's GPUs; a worker's own need not be adjacent.
    held = [torch.device("cuda", 2), torch.device("cuda", 5), torch.device("cuda", 7)]
    assert stage_devices(held[0], 2, held=held) == held[:2]
    with pytest.raises(ValueError, match=r"--model-parallel 3 places a stage on each of a worker's GPUs, but this "
                                         r"worker holds 2 \(cuda:2, cuda:5\); give --gpus-per-worker 3"):
        stage_devices(held[0], 3, held=held[:2])


# ---- where the stage boundaries fall ----------------------------------------------------------------------


def test_resnet50_balanced_by_parameters_cuts_inside_layer4():
    # PyTorch's tutorial splits torchvision's ResNet-50 as stem..layer2 | layer3..head: 1.4M | 24.1M parameters,
    # a split by stage that no balance chooses. By parameters (layer4 holds 15M of the 25.6M) the cut falls
    # after the first block of layer4, 14.6M | 11.0M; by forward FLOPs (which measured time on a GPU follows
    # roughly) one block after the tutorial's, 4.4 | 3.8 GFLOP per image against the tutorial's 3.6 | 4.6.
    net = create_model("resnet50_imagenet", num_classes=1000)
    pipe = _split(net, 2, 1)
    assert [(names[0], names[-1]) for names in pipe.stage_units] == [("stem", "layer4.0"), ("layer4.1", "head")]
    assert pipe.stage_costs == [14_582_848, 10_974_184]
    assert "stage 1 on cpu: stem..layer4.0 (14,582,848 parameters)" in pipe.describe("params")

    from torch.utils.flop_counter import FlopCounterMode

    units, flops, x = pipeline_units(net.eval()), [], torch.zeros(1, 3, 224, 224)
    with torch.no_grad():
        for _, unit in units:
            with FlopCounterMode(display=False) as counter:
                x = unit(x)
            flops.append(counter.get_total_flops())
    names = [n for n, _ in units]
    assert names[balanced_stage_sizes(flops, 2)[0] - 1] == "layer3.0"  # the tutorial's: layer2.3


def test_the_balanced_split_is_the_best_contiguous_split():
    rng = random.Random(0)
    for _ in range(200):
        costs = [rng.choice([0, 1, 2, 5, 10, rng.random() * 100]) for _ in range(rng.randint(1, 9))]
        stages = rng.randint(1, len(costs))
        sizes = balanced_stage_sizes(costs, stages)
        assert len(sizes) == stages and min(sizes) >= 1 and sum(sizes) == len(costs)

        def worst(cuts):
            bounds = [0, *cuts, len(costs)]
            return max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))

        best = min(worst(c) for c in itertools.combinations(range(1, len(costs)), stages - 1))
        assert worst(list(itertools.accumulate(sizes))[:-1]) == pytest.approx(best)


def test_balance_by_time_measures_every_unit_and_leaves_the_model_as_it_was():
    net = _model("resnet8").train()
    before = copy.deepcopy(net.state_dict())
    units, sample = pipeline_units(net), torch.randn(4, 3, 32, 32)
    rng_before = torch.get_rng_state()  # what dropout draws from
    seconds = measured_seconds(units, sample, repeats=2)
    assert len(seconds) == len(units) and all(s > 0 for s in seconds)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BatchNorm statistics too
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert unit_costs(units, balance="time", sample=torch.randn(2, 3, 32, 32)) != unit_costs(units, balance="params")


# ---- errors -------------------------------------------------------------------------------------------------


def test_more_stages_than_units_is_a_one_line_error():
    units = pipeline_units(create_model("resnet8", num_classes=10))
    with pytest.raises(ValueError, match=r"^--model-parallel 6: the model has 5 pipeline units \(stem..head\), so at "
                                         r"most 5 stages$"):
        Pipeline(units, costs=[1.0] * 5, devices=[CPU] * 6, micro_batches=1)


def test_a_model_without_units_is_a_one_line_error_naming_the_models_that_have_them():
    with pytest.raises(ValueError, match=r"^Sequential defines no pipeline units \(a pipeline_units\(\) method\); "
                                         r"the models that do: resnet18, resnet18_imagenet, resnet50, .*wrn_dli$"):
        pipeline_units(torch.nn.Sequential(torch.nn.Linear(2, 2)))


CPU_SPLIT = dict(model_parallel=2, use_gpu=False)


@pytest.mark.parametrize("settings, message", [
    (dict(micro_batches=4), r"^--micro-batches 4 pipelines a model split over devices; give --model-parallel 2"),
    (dict(pipeline_balance="time"), r"^--pipeline-balance time pipelines a model split over devices"),
    (dict(model_parallel=2), r"^--model-parallel 2 places a stage on each of a worker's GPUs: give "
                             r"--gpus-per-worker 2 \(got 1\), or --no-use-gpu"),
    (dict(CPU_SPLIT, micro_batches=128, batch_size=64), r"^--micro-batches 128 is more than the 64 images"),
    (dict(CPU_SPLIT, compile=True), r"^--compile with --model-parallel 2: not supported .*drop --compile, or give "
                                    r"--model-parallel 1$"),
    (dict(CPU_SPLIT, sync_batchnorm=True), r"^--sync-batchnorm with --model-parallel 2: not supported"),
    (dict(CPU_SPLIT, model_parallel=6), r"^--model-parallel 6: --model resnet8 has 5 pipeline units \(stem..head\), "
                                        r"so at most 5 stages$"),
    (dict(CPU_SPLIT, model_parallel=0), r"^--model-parallel must be positive, got 0$"),
    (dict(CPU_SPLIT, pipeline_balance="flops"), r"^--pipeline-balance 'flops' is not one of: params, time$"),
])
def test_bad_model_parallel_settings_are_one_line_config_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        validate(TrainConfig(**settings))
    validate(TrainConfig(model_parallel=2, micro_batches=4, gpus_per_worker=2))  # on GPUs: K GPUs per worker


# ---- the split model trains under 2-worker DDP ------------------------------------------------------------


def test_two_workers_train_the_split_model_and_save_the_unsplit_models_weights(tmp_path, capfd):
    """raydist's real loop on 2 gloo processes (tests/local_ddp.py), each worker's resnet8 in 2 stages with 2
    micro-batches (all on its CPU), DDP over the split model, augmentation on. The stages are balanced by
    measured time, which differs between the ranks: rank 0's costs are broadcast, so both cut alike (else
    DDP's buckets would not match)."""
    cfg = TrainConfig(model="resnet8", model_parallel=2, micro_batches=2, pipeline_balance="time", use_gpu=False,
                      augment="crop_flip", num_workers=2, cpus_per_worker=1.0, batch_size=64, lr=0.8,
                      warmup_epochs=0.5, epochs=4)
    validate(cfg)
    history = run_ddp(cfg, tmp_path)
    assert [m["world_size"] for m in history] == [2] * 4
    assert history[-1]["val_acc"] > 0.6  # it learned (chance: 0.1; 0.80 here, the unsplit model 0.61)
    assert "model parallel, 2 stages balanced by time: stage 1 on cpu: stem.." in capfd.readouterr().out
    final = load_checkpoint_file(str(tmp_path / FINAL_MODEL_FILE))
    unsplit = create_model("resnet8", num_classes=10)
    unsplit.load_state_dict(final["model"])  # strict: the unsplit model's keys, every one
    # The reported accuracy is the saved model's, evaluated unsplit here (within one image of 359: the split
    # evaluation in micro-batches rounds differently).
    assert digits_val_accuracy(final) == pytest.approx(history[-1]["val_acc"], abs=1.5 / 359)
    split = copy.deepcopy(unsplit)
    pipe = _split(split, 2, 2).eval()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        _assert_near(pipe(x), unsplit.eval()(x), "the saved model's eval logits, split against unsplit")
