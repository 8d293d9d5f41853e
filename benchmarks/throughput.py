"""Training throughput: images/s (and MFU on a GPU) of raydist's loop against a plain PyTorch loop with a
torchvision DataLoader, per model, batch size and compile, side by side in one run.

    python benchmarks/throughput.py                                  # the CPU table: small settings
    python benchmarks/throughput.py --device cuda --steps 100 --batch-sizes 128 256 512 --compile off on \
        --json docs/throughput_gpu.json                              # on a GPU machine

Both sides train the same model from the same initial weights with SGD (momentum 0.9, Nesterov, weight decay
5e-4), crop+flip augmentation and the same precision (--precision auto: bf16 autocast on GPUs of compute capability
8.0 and later, fp16 with a grad scaler before, fp32 on the CPU):
- raydist: raydist.loop.state.TrainingState.train_epoch, the loop every run and trial uses: data held as uint8 on
  the device, augmented there in batches, channels_last (--channels-last), no host sync inside the epoch;
- loop: the usual alternative, a torchvision-style Dataset of uint8 images turned into PIL images, per-image
  RandomCrop(padding 4) + RandomHorizontalFlip + ToTensor + Normalize, a DataLoader with --loader-workers
  processes (4) and pinned memory on a GPU, the model in the same memory format (channels_last, raydist's
  default on every device), fused SGD on a GPU.
32x32 models see CIFAR-shaped random images; resnet50_imagenet sees 3x224x224 images (raydist: its `fake`
source, generated on the device; loop: torchvision's FakeData). Each measurement is one epoch of --steps
steps after a warm-up epoch of the same length (which also compiles); --repeats measurements per side,
the sides interleaved, median reported.

MFU = training FLOPs per second / the device's dense bf16 peak. Training FLOPs per image are counted from
the model's layers by torch's FlopCounterMode over one forward and backward (about 3x the forward; ResNet-18
at 32x32: 3.3 GFLOP). CPUs have no MFU column.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from bench_env import describe, environment
from raydist.loop.recipe import apply_device_settings
from raydist.preflight import validate

# model -> input side; the 32x32 ones are CIFAR models, resnet50_imagenet the DDP workload test's model
MODELS = {"resnet18": 32, "wrn16_4": 32, "wrn28_10": 32, "wrn_dli": 32, "resnet50_imagenet": 224}
OTHER_MODELS = {"resnet8": 32, "resnet18_imagenet": 224}  # measurable too (--models), not in the default table
# Dense bf16 tensor-core peaks (FLOP/s, NVIDIA's datasheets without sparsity), by the first substring of
# torch.cuda.get_device_name() that matches: longer names first ("L40S" before "L40" before "L4").
PEAK_BF16 = {"H200": 989.4e12, "H100 PCIe": 756.0e12, "H100": 989.4e12, "A100": 312.0e12, "L40S": 362.0e12,
             "L40": 181.0e12, "L4": 121.0e12, "A10G": 70.0e12, "A10": 125.0e12}
SIZES = {**MODELS, **OTHER_MODELS}
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def peak_flops(device: torch.device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def train_flops_per_image(model_name: str, size: int) -> float:
    """FLOPs of one training step's forward and backward, per image, counted from the layers."""
    from torch.utils.flop_counter import FlopCounterMode

    from raydist.models.registry import create_model

    net = create_model(model_name, num_classes=1000 if size == 224 else 10).train()
    x = torch.randn(2, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        net(x).sum().backward()
    return counter.get_total_flops() / 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- raydist's loop ------------------------------------------------------------------------------------


def raydist_side(model: str, batch: int, compile_: bool, device: torch.device, steps: int, precision: str,
                 threads: int, channels_last: bool = True) -> float:
    from raydist.config.fields import TrainConfig
    from raydist.data.sources import FakeSource, TensorSource
    from raydist.loop.state import TrainingState

    size = SIZES[model]
    images = steps * batch
    memory = {"channels_last": "on" if channels_last else "off"}
    if size == 224:
        cfg = TrainConfig(dataset="fake", fake_image_size=224, fake_num_classes=1000, fake_train_size=images,
                          model=model, batch_size=batch, compile=compile_, precision=precision, num_workers=1,
                          warmup_epochs=0, cpus_per_worker=float(threads), **memory)
        validate(cfg)
        train = FakeSource(images, 224, 1000, salt=0, device=device)
    else:
        cfg = TrainConfig(dataset="cifar10", model=model, batch_size=batch, compile=compile_, precision=precision,
                          num_workers=1, warmup_epochs=0, cpus_per_worker=float(threads), **memory)
        validate(cfg)
        generator = torch.Generator().manual_seed(0)
        train = TensorSource(torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=generator),
                             torch.randint(0, 10, (images,), generator=generator)).to(device)
    torch.manual_seed(0)
    apply_device_settings(cfg, device)  # the loop's own: cuDNN autotune and TF32 on a GPU, the thread pool on a CPU
    state = TrainingState(cfg, device=device, rank=0, world=1, train_set=train, val_set=train)
    state.enter_epoch(0)
    state.train_epoch()  # warm-up (and compile)
    state.epoch = 1
    sums = state.train_epoch()
    return images / sums.seconds


# ---- the usual alternative: per-image transforms in DataLoader workers ----------------------------------


class UInt8Images(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 does per item: a uint8 HWC array -> PIL image -> transforms."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def loop_side(model: str, batch: int, compile_: bool, device: torch.device, steps: int, precision: str,
              loader_workers: int, channels_last: bool = True) -> float:
    import torchvision
    from torchvision import transforms

    from raydist.loop.recipe import autocast_dtype
    from raydist.models.registry import create_model

    size = SIZES[model]
    images = steps * batch
    transform = transforms.Compose([transforms.RandomCrop(size, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    if size == 224:
        dataset = torchvision.datasets.FakeData(images, (3, 224, 224), 1000, transform=transform)
    else:
        generator = torch.Generator().manual_seed(0)
        pixels = torch.randint(0, 256, (images, 32, 32, 3), dtype=torch.uint8, generator=generator).numpy()
        dataset = UInt8Images(pixels, torch.randint(0, 10, (images,), generator=generator).numpy(), transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=loader_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=loader_workers > 0)
    torch.manual_seed(0)  # the memory format is raydist's (auto: channels_last): like for like on every device
    net = create_model(model, num_classes=1000 if size == 224 else 10)
    net = net.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    fused = True if device.type == "cuda" else None
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                                fused=fused)
    step_model = torch.compile(net) if compile_ else net
    amp = autocast_dtype(precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)  # auto on GPUs before 8.0: fp16
    criterion = torch.nn.CrossEntropyLoss()
    seconds = 0.0
    for epoch in range(2):  # the first warms up (and compiles)
        _sync(device)
        t0 = time.perf_counter()
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = criterion(step_model(x), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        _sync(device)
        seconds = time.perf_counter() - t0
    return images / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(SIZES))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64])
    parser.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"])
    parser.add_argument("--channels-last", nargs="+", default=["on"], choices=["off", "on"],
                        help="memory formats to measure, both sides alike (raydist's default: on)")
    parser.add_argument("--steps", type=int, default=8, help="steps per measured epoch (and per warm-up epoch)")
    parser.add_argument("--steps-224", type=int, default=2, help="the same for the 224x224 model (slow on a CPU)")
    parser.add_argument("--batch-224", type=int, help="batch size for the 224x224 model (default: --batch-sizes)")
    parser.add_argument("--repeats", type=int, default=1, help="measurements per side (interleaved; median)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--loader-workers", type=int, default=4, help="DataLoader worker processes of the loop")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads on a CPU")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args()
    env = environment(sys.argv)
    device = torch.device(args.device)
    from raydist.config.fields import TrainConfig

    # Both sides under the loop's settings, from the first measurement on (they are process-wide).
    apply_device_settings(TrainConfig(precision=args.precision, cpus_per_worker=float(args.threads)), device)
    peak = peak_flops(device)
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
    rows = []
    for model in args.models:
        size = SIZES[model]
        flops = train_flops_per_image(model, size)
        batches = [args.batch_224] if size == 224 and args.batch_224 else args.batch_sizes
        steps = args.steps_224 if size == 224 else args.steps
        for batch in batches:
            for compiled, memory in [(c, m) for c in args.compile for m in args.channels_last]:
                measured = {"raydist": [], "loop": []}
                for repeat in range(args.repeats):
                    order = ("raydist", "loop") if repeat % 2 == 0 else ("loop", "raydist")
                    for side in order:
                        if side == "raydist":
                            value = raydist_side(model, batch, compiled == "on", device, steps, args.precision,
                                                 args.threads, memory == "on")
                        else:
                            value = loop_side(model, batch, compiled == "on", device, steps, args.precision,
                                              args.loader_workers, memory == "on")
                        measured[side].append(value)
                        torch.set_num_threads(args.threads)  # the engine sets it too; keep both sides alike
                ours, theirs = statistics.median(measured["raydist"]), statistics.median(measured["loop"])
                row = {"model": model, "input": size, "batch": batch, "compile": compiled, "channels_last": memory,
                       "raydist_img_s": ours,
                       "loop_img_s": theirs, "ratio": ours / theirs, "train_gflop_per_image": flops / 1e9,
                       "mfu_raydist": ours * flops / peak if peak else None,
                       "mfu_loop": theirs * flops / peak if peak else None, "values": measured}
                rows.append(row)
                print(_line(row), flush=True)
    print(describe(env) + (f"; {env['device']}" if "device" in env else "") +
          f"; device {args.device}, precision {args.precision}, {args.loader_workers} loader workers")
    print("| model | input | batch | compile | channels_last | raydist img/s | DataLoader loop img/s | raydist / loop | "
          "train GFLOP/image | MFU raydist | MFU loop |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(_table_row(row))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": env, "settings": vars(args), "rows": rows}, fh, indent=1)


def _line(row: dict) -> str:
    return (f"{row['model']} {row['input']}px batch {row['batch']} compile {row['compile']} channels_last "
            f"{row['channels_last']}: raydist "
            f"{row['raydist_img_s']:,.1f} img/s, loop {row['loop_img_s']:,.1f} img/s, ratio {row['ratio']:.2f}")


def _table_row(row: dict) -> str:
    mfu = [f"{row[k]:.1%}" if row[k] is not None else "—" for k in ("mfu_raydist", "mfu_loop")]
    return (f"| {row['model']} | {row['input']} | {row['batch']} | {row['compile']} | {row['channels_last']} | "
            f"{row['raydist_img_s']:,.1f} | "
            f"{row['loop_img_s']:,.1f} | {row['ratio']:.2f} | {row['train_gflop_per_image']:.2f} | {mfu[0]} | "
            f"{mfu[1]} |")


if __name__ == "__main__":
    main()
