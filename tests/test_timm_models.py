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
