"""Any timm model (`--model timm:NAME`): built through timm with the run's class count, trained under 2-worker
DDP on digits, fine-tuned by the stages of its own structure from a .safetensors file or timm's Hugging Face
cache, and refused in one line when the name, an argument or the image side does not fit.

timm's test_* architectures are real timm models (the same builders and blocks as their full-size siblings)
at 0.1-0.4 M parameters, which is what lets them train in seconds on 2 CPU cores.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch as safetensors_torch
import timm  # the [timm] extra, which the dev install (and so CI) has
import torch
from conftest import digits_val_accuracy
from local_ddp import run_ddp

from raydist.config.fields import TrainConfig
from raydist.errors import ConfigError
from raydist.models.timm_models import timm_builder
from raydist.models.transfer import build_model, read_weights_file, transfer_units
from raydist.preflight import validate
from raydist.runs.checkpoints import CHECKPOINT_FILE, FINAL_MODEL_FILE

DIGITS = dict(dataset="digits", num_workers=2, cpus_per_worker=1.0, batch_size=32, lr=0.2, warmup_epochs=0.5,
              augment="crop_flip")


@pytest.mark.parametrize("arch, epochs, bar", [
    ("test_resnet", 6, 0.9),
    ("test_efficientnet", 8, 0.85),
    # 4 patches of 16 px for a 32 px digit: a ViT learns slower (seeds 0-2 ended at 57-62%; chance: 10%)
    ("test_vit", 8, 0.45),
])
def test_a_timm_model_trains_on_digits_under_2_worker_ddp_and_its_saved_model_scores_what_the_run_said(
        tmp_path, arch, epochs, bar):
    opt = dict(optimizer="adamw", lr=2e-3) if arch == "test_vit" else {}
    cfg = validate(TrainConfig(model=f"timm:{arch}", epochs=epochs, **{**DIGITS, **opt}))
    history = run_ddp(cfg, tmp_path)
    assert history[-1]["val_acc"] > bar
    final = torch.load(tmp_path / FINAL_MODEL_FILE, weights_only=True)
    assert final["model_name"] == f"timm:{arch}"
    assert digits_val_accuracy(final) == pytest.approx(history[-1]["val_acc"], abs=1e-6)


# ---- fine-tuning from a timm model's weights -------------------------------------------------------------


@pytest.fixture(scope="module")
def source_weights(tmp_path_factory):
    """timm:test_resnet trained on digits 0-4, its weights saved as a .safetensors file (the format timm's
    weights are published in), head included as in a published file."""
    folder = tmp_path_factory.mktemp("timm_source")
    cfg = validate(TrainConfig(model="timm:test_resnet", classes="0-4", epochs=4, **DIGITS))
    history = run_ddp(cfg, folder / "run")
    assert history[-1]["val_acc"] > 0.9
    state = torch.load(folder / "run" / FINAL_MODEL_FILE, weights_only=True)["model"]
    path = folder / "test_resnet.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path, state


def test_a_safetensors_file_loads_its_backbone_bit_for_bit_with_a_new_head(source_weights):
    path, state = source_weights
    net = build_model("timm:test_resnet", num_classes=3, source=read_weights_file(str(path)))
    for key, value in net.state_dict().items():
        if key.startswith("fc."):
            assert value.shape[0] == 3
        else:
            assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("arch, head, stages", [
    ("test_resnet", "fc", ["layer4.0", "layer3.0", "layer2.0", "layer1.0", "stem"]),
    ("test_convnext", "head.fc", ["head.norm", "stages.3", "stages.2", "stages.1", "stages.0.blocks.0", "stem"]),
    ("test_vit", "head", ["blocks.5+norm", "blocks.4", "blocks.3", "blocks.2", "blocks.1", "blocks.0", "stem"]),
    ("test_efficientnet", "classifier", ["blocks.4+conv_head+bn2", "blocks.3.0", "blocks.2.0", "blocks.1.0",
                                         "blocks.0.0", "stem"]),
])
def test_fine_tuning_stages_come_from_the_models_own_structure_and_hold_every_parameter_once(arch, head, stages):
    net = build_model(f"timm:{arch}", num_classes=5)
    units = transfer_units(net, new_stem=False)
    assert [u.name for u in units] == [head] + stages
    assert units[0].new and not any(u.new for u in units[1:])
    held = [id(p) for u in units for p in u.params]
    assert sorted(held) == sorted(id(p) for p in net.parameters())
    assert {id(p) for p in units[0].params} == {id(p) for p in net.get_submodule(head).parameters()}


def test_gradual_fine_tuning_of_a_timm_model_wakes_its_stages_in_turn_and_learns(tmp_path, source_weights):
    path, _ = source_weights
    cfg = validate(TrainConfig(model="timm:test_resnet", weights=str(path), finetune="gradual", unfreeze_every=1,
                               backbone_lr_mult=0.1, epochs=6, checkpoint_every=1,
                               **{**DIGITS, "classes": "5-9", "train_per_class": 20, "batch_size": 10,
                                  "lr": 0.5}))
    history = run_ddp(cfg, tmp_path)
    trainable = [h["trainable_params"] for h in history]
    assert trainable == sorted(trainable) and trainable[0] < trainable[-1]
    assert history[-1]["val_acc"] > 0.5  # 100 labelled images of 5 new classes (chance: 0.2)
    state = torch.load(tmp_path / "checkpoint_epoch_0003" / CHECKPOINT_FILE, weights_only=True)
    lrs = {g["unit"]: g["lr"] for g in state["optimizer"]["param_groups"]}
    assert set(lrs) == {"fc", "layer4.0", "layer3.0", "layer2.0", "layer1.0", "stem"}
    assert lrs["layer1.0"] == pytest.approx(lrs["fc"] * 0.1)


def test_pretrained_comes_through_timms_own_loader_from_the_hugging_face_cache(tmp_path, source_weights):
    """A Hugging Face cache as the hub client writes it (refs/main naming a snapshot holding
    model.safetensors), read offline in a fresh process: the backbone is the cached file's."""
    path, state = source_weights
    hub_id = timm.models.get_pretrained_cfg("test_resnet").hf_hub_id
    repo = tmp_path / "hub" / ("models--" + hub_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    full = {**state, "fc.weight": torch.zeros(1000, state["fc.weight"].shape[1]), "fc.bias": torch.zeros(1000)}
    safetensors_torch.save_file({k: v.contiguous() for k, v in full.items()},
                                str(repo / "snapshots" / commit / "model.safetensors"))
    script = textwrap.dedent(f"""
        import torch
        from raydist.config.fields import TrainConfig
        from raydist.preflight import validate
        from raydist.run_config import check_weights
        from raydist.models.transfer import build_model, pretrained_source
        cfg = validate(TrainConfig(model="timm:test_resnet", pretrained=True, num_workers=1))
        check_weights(cfg)
        net = build_model("timm:test_resnet", num_classes=10, source=pretrained_source("timm:test_resnet"))
        torch.save(net.state_dict(), {str(tmp_path / "built.pt")!r})
    """)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    built = torch.load(tmp_path / "built.pt", weights_only=True)
    assert all(torch.equal(built[k], state[k]) for k in built if not k.startswith("fc."))
    assert built["fc.weight"].shape == (10, state["fc.weight"].shape[1])


# ---- refused before anything starts ----------------------------------------------------------------------


@pytest.mark.parametrize("values, message", [
    (dict(model="timm:resnt18"),
     r"^unknown timm model 'resnt18' \(--model timm:resnt18\); close: timm:resnet18, .*timm.list_models"),
    (dict(model="timm:test_resnet", model_args={"img_size": 32}),
     r"^--model timm:test_resnet --model-arg img_size=32: timm cannot build it \(.*unexpected keyword argument "
     r"'img_size'\)$"),
    (dict(model="timm:test_resnet", model_args={"depth": 3}),
     r"^--model-arg depth=3: timm:test_resnet takes drop_rate \(float, default 0.0\), drop_path_rate"),
    (dict(model="timm:test_vit", input_size=40),
     r"^--model timm:test_vit cannot read images of 40 pixels a side \(.*divisible by patch size.*\); give "
     r"--input-size"),
    (dict(model="timm:resnet18.nosuchtag"),
     r"^timm has no weights tagged 'nosuchtag' for resnet18 \(--model timm:resnet18.nosuchtag\); its tags: resnet18\."),
    (dict(model="timm:test_resnet", model_parallel=2, use_gpu=False),
     r"^--model-parallel 2: raydist splits only its own models into pipeline stages \(resnet18, .*\), not --model "
     r"timm:test_resnet$"),
    (dict(model="timm:naflexvit_base_patch16_parfac_gap", grey_input="sum"),
     r"^--grey-input sum: --model timm:naflexvit_base_patch16_parfac_gap has no convolution that reads the image"),
])
def test_a_timm_model_that_does_not_fit_is_one_line_before_anything_starts(values, message):
    with pytest.raises(ConfigError, match=message) as caught:
        validate(TrainConfig(**{**DIGITS, **values}))
    assert "\n" not in str(caught.value)


def test_without_timm_installed_a_timm_model_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    timm_builder.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r'^--model timm:test_resnet needs timm, which is not installed: '
                                              r'pip install "raydist\[timm\]"$'):
            validate(TrainConfig(**{**DIGITS, "model": "timm:test_resnet"}))
    finally:
        timm_builder.cache_clear()


# ---- timm's own layers kept whole ------------------------------------------------------------------------


def test_sync_batchnorm_keeps_timms_fused_norm_and_activation():
    from raydist.models.registry import sync_batchnorm

    torch.manual_seed(0)
    net = build_model("timm:test_efficientnet", num_classes=5).eval()
    x = torch.rand(4, 3, 32, 32)
    expected = net(x)
    synced = sync_batchnorm(net).eval()  # eval: the running statistics, no collective needed
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    assert torch.allclose(synced(x), expected, atol=1e-6)


@pytest.mark.parametrize("arch", ["test_efficientnet", "test_nfnet"])
def test_a_grey_stem_keeps_the_stems_own_conv_class(arch):
    torch.manual_seed(0)
    rgb = build_model(f"timm:{arch}", num_classes=5).eval()
    torch.manual_seed(0)
    grey = build_model(f"timm:{arch}", num_classes=5, grey_input="sum").eval()
    from raydist.models.transfer import first_conv

    (_, before), (_, after) = first_conv(rgb), first_conv(grey)
    assert type(after) is type(before) and after.in_channels == 1 and after.weight.shape[1] == 1
    x = torch.rand(2, 1, 32, 32)
    gap = (grey(x) - rgb(x.repeat(1, 3, 1, 1))).abs().max().item()
    if arch == "test_efficientnet":  # a plain conv: summed filters on one channel are the same function
        assert gap < 1e-5
    else:  # nfnet's ScaledStdConv2d standardises the summed filter: close, not equal, and scaled for 1 input
        assert gap < 0.1 and after.scale == pytest.approx(before.scale * 3 ** 0.5)


def test_a_distilled_models_two_heads_and_a_model_without_timms_grouping_get_units_of_their_own():
    with torch.device("meta"):  # structure only: no memory, no time
        deit = build_model("timm:deit_tiny_distilled_patch16_224", num_classes=5, model_args={"img_size": 32})
        pit = build_model("timm:pit_ti_224", num_classes=5)
    deit_units = transfer_units(deit, new_stem=False)
    assert deit_units[0].name == "head+head_dist" and len(deit_units[0].params) == 4
    assert [u.name for u in transfer_units(pit, new_stem=False)] == ["head", "backbone", "stem"]


def test_a_vit_source_at_another_image_size_has_its_position_table_resampled(tmp_path):
    source = build_model("timm:test_vit", num_classes=10)  # the architecture's own size (160 px)
    path = tmp_path / "vit.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    net = build_model("timm:test_vit", num_classes=5, source=read_weights_file(str(path)),
                      model_args={"img_size": 32})
    assert net.pos_embed.shape[1] < source.pos_embed.shape[1]
    assert torch.equal(net.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 5)


def test_a_timm_run_exports_and_serves_as_raydist_does_and_without_timm_is_one_line(source_weights, tmp_path, capsys,
                                                                                     monkeypatch):
    from cli import run_main

    run = source_weights[0].parent / "run"
    code, said, _ = run_main("raydist.export", [str(run), "--format", "onnx", "--out", str(tmp_path)], capsys,
                             monkeypatch)
    assert code == 0 and "same top class on 100.0%" in said.splitlines()[-1], said
    monkeypatch.setitem(sys.modules, "timm", None)
    timm_builder.cache_clear()
    try:
        code, _, err = run_main("raydist.predict", [str(run), str(tmp_path / "classes.json")], capsys, monkeypatch)
    finally:
        timm_builder.cache_clear()
    assert code == 2 and err.strip().endswith('--model timm:test_resnet needs timm, which is not installed: pip '
                                              'install "raydist[timm]"'), err
