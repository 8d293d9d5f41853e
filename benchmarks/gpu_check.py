"""The GPU path in one run: what this GPU and its software are, raydist's loop against a plain PyTorch loop on
the same GPU-resident data, a real run of the DDP workload test's model, fp16 with the grad scaler, and a
checkpoint's write time. One command, one JSON; about 5 minutes on one H100.

    python benchmarks/gpu_check.py --json docs/gpu_check.json            # on a GPU machine
    python benchmarks/gpu_check.py --dry-run --json /tmp/gpu_check.json  # tiny sizes on the CPU (the tests')

Sections of the JSON:
- environment: torch, CUDA, cuDNN and NCCL versions, the GPU(s), compute capability, bf16 support, Ray.
- loop: per model (the CIFAR ResNet-18 and ResNet-50, batch 256, bf16 autocast, channels_last) and compile
  off/on, raydist's loop (raydist.loop.state.TrainingState.train_epoch: uint8 images on the GPU, augmented
  there in batches) against a plain loop over the same uint8 tensors on the GPU (index, normalise, forward,
  backward, fused SGD): images/s, MFU (training FLOPs counted from the layers over the GPU's dense bf16
  peak), the first epoch's extra seconds (compiling), graphs compiled, peak memory, and the host syncs of
  one epoch (torch.cuda.set_sync_debug_mode("warn"), each sync a warning).
- workload: `resnet50_imagenet` on fake 224-px data through raydist's real loop (raydist.loop.run.run), one
  GPU, two epochs, evaluation and a checkpoint each epoch: the epochs' seconds and images/s.
- fp16: the CIFAR ResNet-18 in raydist's loop under --precision fp16: images/s and the scale it ends at.
- recipe: issue 33's training pieces in raydist's loop (the first loop model, compile off): --mixup/--cutmix,
  --augment randaugment and trivialaugment with --random-erase, --ema, --clip-grad-norm: images/s against the
  same loop without them, and the host syncs of a measured epoch (0 expected: every piece stays on the GPU).
- checkpoint: the CIFAR ResNet-50's checkpoint (weights, momentum): megabytes and the seconds to write it.
- ray: with Ray installed, `python -m raydist.train` on one GPU (and on two when the machine has them).
Every figure comes from the code users run; nothing is tuned for it. Needs no data set and no download.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import torch

from bench_env import environment
from raydist.loop.recipe import apply_device_settings
from throughput import peak_flops, train_flops_per_image

# (models, batch, steps per measured epoch, compile settings, workload side and images, precision)
FULL = dict(models=("resnet18", "resnet50"), batch=256, steps=50, compile=("off", "on"),
            workload_side=224, workload_images=256 * 40, workload_batch=128, precision="bf16")
DRY = dict(models=("resnet8",), batch=8, steps=2, compile=("off",), workload_side=64, workload_images=16,
           workload_batch=8, precision="bf16")


def software(device: torch.device) -> dict:
    found = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device)}
    if device.type == "cuda":
        found.update(cudnn=torch.backends.cudnn.version(), nccl=".".join(map(str, torch.cuda.nccl.version())),
                     gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                     capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                     memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1),
                     bf16=torch.cuda.is_bf16_supported(), peak_bf16_tflops=(peak_flops(device) or 0) / 1e12)
    try:
        import ray

        found["ray"] = ray.__version__
    except ImportError:
        found["ray"] = None
    return found


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cifar_data(images: int, device: torch.device):
    from raydist.data.sources import TensorSource

    generator = torch.Generator().manual_seed(0)
    return TensorSource(torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=generator),
                        torch.randint(0, 10, (images,), generator=generator)).to(device)


def _graphs() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - a figure, not a check
        return 0


class HostSyncs:
    """Counts the host-device syncs of a block on a GPU (each one a warning under sync debug mode)."""

    def __init__(self, device: torch.device):
        self.device, self.count = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            self._caught = warnings.catch_warnings(record=True)
            self._seen = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            self._caught.__exit__(*exc)
            self.count = sum("synchroniz" in str(w.message) for w in self._seen)


def _epochs(train_one_epoch, device: torch.device, images: int) -> dict:
    """A first epoch (warm-up, compiling), then a measured one: images/s, the first epoch's extra seconds,
    graphs compiled, peak memory, host syncs of the measured epoch."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    graphs = _graphs()
    _sync(device)
    t0 = time.perf_counter()
    train_one_epoch()
    _sync(device)
    first = time.perf_counter() - t0
    with HostSyncs(device) as syncs:
        t0 = time.perf_counter()
        train_one_epoch()
        _sync(device)
        steady = time.perf_counter() - t0
    return {"images_per_s": images / steady, "first_epoch_extra_s": max(0.0, first - steady),
            "graphs": _graphs() - graphs, "host_syncs": syncs.count,
            "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)}


def raydist_loop(model: str, batch: int, steps: int, compiled: bool, precision: str, device: torch.device,
                 **recipe) -> dict:
    """raydist's training loop on GPU-resident CIFAR-shaped data; `recipe`: more TrainConfig fields."""
    from raydist.config.fields import TrainConfig
    from raydist.loop.state import TrainingState
    from raydist.preflight import validate

    cfg = validate(TrainConfig(dataset="cifar10", model=model, batch_size=batch, compile=compiled,
                               precision=precision, num_workers=1, warmup_epochs=0, channels_last="on",
                               cpus_per_worker=float(torch.get_num_threads()), **recipe))
    data = _cifar_data(batch * steps, device)
    apply_device_settings(cfg, device)
    torch.manual_seed(0)
    state = TrainingState(cfg, device=device, rank=0, world=1, train_set=data, val_set=data)
    state.enter_epoch(0)
    figures = _epochs(lambda: state.train_epoch(), device, batch * steps)
    if state.scaler.is_enabled():
        figures["final_scale"] = state.scaler.get_scale()
    return figures


def plain_loop(model: str, batch: int, steps: int, compiled: bool, precision: str, device: torch.device) -> dict:
    """The loop a PyTorch user writes, over the same uint8 images on the GPU: no augmentation (raydist's
    crop+flip is part of its side's cost), normalise, forward under autocast, backward, fused SGD."""
    from raydist.models.registry import create_model

    data = _cifar_data(batch * steps, device)
    torch.manual_seed(0)
    net = create_model(model, num_classes=10).to(device, memory_format=torch.channels_last)
    runner = torch.compile(net) if compiled else net
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                                fused=device.type == "cuda")
    mean = torch.tensor((0.4914, 0.4822, 0.4465), device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor((0.2470, 0.2435, 0.2616), device=device).view(1, 3, 1, 1) * 255
    dtype = {"bf16": torch.bfloat16, "fp32": None}[precision]
    order = torch.arange(batch * steps, device=device)

    def epoch():
        for i in range(steps):
            index = order[i * batch:(i + 1) * batch]
            x = ((data.images[index].float() - mean) / std).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = torch.nn.functional.cross_entropy(runner(x), data.labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return _epochs(epoch, device, batch * steps)


def loop_table(plan: dict, device: torch.device) -> list[dict]:
    peak = peak_flops(device)
    rows = []
    for model in plan["models"]:
        flops = train_flops_per_image(model, 32)
        for compiled in plan["compile"]:
            row = {"model": model, "batch": plan["batch"], "compile": compiled, "precision": plan["precision"]}
            for side, measure in (("raydist", raydist_loop), ("plain", plain_loop)):
                figures = measure(model, plan["batch"], plan["steps"], compiled == "on", plan["precision"], device)
                if peak:
                    figures["mfu"] = figures["images_per_s"] * flops / peak
                row[side] = figures
            row["raydist_over_plain"] = row["raydist"]["images_per_s"] / row["plain"]["images_per_s"]
            print(f"loop {model} compile {compiled}: raydist {row['raydist']['images_per_s']:,.0f} img/s, plain "
                  f"{row['plain']['images_per_s']:,.0f} img/s (x{row['raydist_over_plain']:.2f}), host syncs "
                  f"{row['raydist']['host_syncs']}", flush=True)
            rows.append(row)
    return rows


RECIPE_PIECES = {
    "mixup_cutmix": dict(mixup=0.2, cutmix=1.0, label_smoothing=0.1),
    "randaugment_erase": dict(augment="randaugment", random_erase=0.25),
    "trivialaugment_erase": dict(augment="trivialaugment", random_erase=0.25),
    "ema": dict(ema=0.999),
    "clip_grad_norm": dict(clip_grad_norm=1.0),
}


def recipe_table(plan: dict, device: torch.device) -> list[dict]:
    """Each training piece of issue 33 in raydist's loop against the same loop without it, side by side."""
    model = plan["models"][0]
    base = raydist_loop(model, plan["batch"], plan["steps"], False, plan["precision"], device)
    rows = []
    for piece, fields in RECIPE_PIECES.items():
        figures = raydist_loop(model, plan["batch"], plan["steps"], False, plan["precision"], device, **fields)
        rows.append({"piece": piece, "fields": fields, "model": model, "images_per_s": figures["images_per_s"],
                     "over_plain_recipe": figures["images_per_s"] / base["images_per_s"],
                     "host_syncs": figures["host_syncs"], "plain_recipe_images_per_s": base["images_per_s"]})
        print(f"recipe {piece}: {figures['images_per_s']:,.0f} img/s (x{rows[-1]['over_plain_recipe']:.2f} of "
              f"{base['images_per_s']:,.0f}), host syncs {figures['host_syncs']}", flush=True)
    return rows


def workload(plan: dict, device: torch.device, folder: str) -> dict:
    """resnet50_imagenet (the dry run: resnet18_imagenet) on fake data through raydist's real loop."""
    from raydist.config.fields import TrainConfig
    from raydist.loop.context import local_context
    from raydist.loop.run import run
    from raydist.preflight import validate

    model = "resnet50_imagenet" if plan is FULL else "resnet18_imagenet"
    cfg = validate(TrainConfig(dataset="fake", model=model, fake_image_size=plan["workload_side"],
                               fake_num_classes=1000, fake_train_size=plan["workload_images"],
                               fake_val_size=plan["workload_batch"] * 4, batch_size=plan["workload_batch"],
                               epochs=2, warmup_epochs=0, num_workers=1, checkpoint_every=1,
                               cpus_per_worker=float(torch.get_num_threads())))
    t0 = time.perf_counter()
    history = run(cfg, local_context(folder, device=str(device)))
    seconds = time.perf_counter() - t0
    result = {"model": model, "side": plan["workload_side"], "batch": cfg.batch_size, "seconds": seconds,
              "epochs": [{k: m.get(k) for k in ("epoch", "epoch_time_s", "images_per_s", "val_acc")}
                         for m in history]}
    print(f"workload {model}: {len(history)} epochs in {seconds:.1f} s, last "
          f"{history[-1].get('images_per_s', 0):,.0f} img/s", flush=True)
    return result


def checkpoint_write(device: torch.device, model: str) -> dict:
    from raydist.config.fields import TrainConfig
    from raydist.loop.state import TrainingState
    from raydist.preflight import validate

    cfg = validate(TrainConfig(dataset="cifar10", model=model, batch_size=8, num_workers=1, warmup_epochs=0))
    data = _cifar_data(16, device)
    state = TrainingState(cfg, device=device, rank=0, world=1, train_set=data, val_set=data)
    state.enter_epoch(0)
    state.train_epoch()  # momentum buffers exist, as at any epoch end
    _sync(device)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "checkpoint.pt")
        t0 = time.perf_counter()
        torch.save(state.state_dict({"epoch": 1}), path)
        seconds = time.perf_counter() - t0
        megabytes = os.path.getsize(path) / 1e6
    print(f"checkpoint {model}: {megabytes:.0f} MB written in {seconds:.2f} s", flush=True)
    return {"model": model, "megabytes": megabytes, "seconds": seconds}


def ray_runs(device: torch.device, folder: str) -> list[dict]:
    """`python -m raydist.train` through Ray Train on one GPU, and two when there are (a local cluster)."""
    runs = []
    for workers in (1, 2) if torch.cuda.device_count() >= 2 else (1,):
        args = [sys.executable, "-m", "raydist.train", "--dataset", "fake", "--model", "resnet18",
                "--fake-train-size", "25600", "--fake-val-size", "2560", "--batch-size", "256", "--epochs", "2",
                "--num-workers", str(workers), "--use-gpu", "--storage-path", folder, "--name", f"gpu{workers}"]
        t0 = time.perf_counter()
        done = subprocess.run(args, capture_output=True, text=True, timeout=600)
        lines = (done.stdout + done.stderr).strip().splitlines()
        runs.append({"workers": workers, "exit": done.returncode, "seconds": time.perf_counter() - t0,
                     "last_lines": lines[-6:]})
        print(f"ray: {workers} GPU worker(s): exit {done.returncode} in {runs[-1]['seconds']:.0f} s", flush=True)
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: every section's code, no GPU")
    parser.add_argument("--no-ray", action="store_true", help="leave out the Ray Train runs")
    parser.add_argument("--json", required=True, help="write the results here")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no GPU visible to torch (torch.cuda.is_available() is False); --dry-run runs every "
              "section's code on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    plan = DRY if args.dry_run else FULL
    result = {"environment": environment(sys.argv), "software": software(device), "dry_run": args.dry_run}
    with tempfile.TemporaryDirectory() as folder:
        result["loop"] = loop_table(plan, device)
        result["recipe"] = recipe_table(plan, device)
        result["workload"] = workload(plan, device, os.path.join(folder, "workload"))
        fp16 = raydist_loop(plan["models"][0], plan["batch"], plan["steps"], False, "fp16", device)
        result["fp16"] = {"model": plan["models"][0], **fp16}
        print(f"fp16 {plan['models'][0]}: {fp16['images_per_s']:,.0f} img/s, scale {fp16.get('final_scale')}",
              flush=True)
        result["checkpoint"] = checkpoint_write(device, "resnet50" if not args.dry_run else "resnet8")
        ray_installed = result["software"]["ray"] is not None
        result["ray"] = ray_runs(device, os.path.join(folder, "ray")) if ray_installed and not (
            args.no_ray or args.dry_run) else None
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
