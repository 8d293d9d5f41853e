"""Model parallelism's throughput: training images/s of torchvision's ResNet-50 at 224 px unsplit on one GPU,
split over two GPUs (naively: one micro-batch, so one GPU idles while the other works) and pipelined (2, 4
and 8 micro-batches, GPipe), side by side in one run.

    python benchmarks/model_parallel.py --json docs/model_parallel_gpu.json     # a machine with 2 GPUs or more
    python benchmarks/model_parallel.py --stage-devices cuda:0 cuda:0           # 1 GPU: the micro-batches' cost
    python benchmarks/model_parallel.py --smoke                                 # CPU, tiny sizes, seconds

Every side trains the same model from the same weights on the same batch (random images resident on the
first device, labels on the last), SGD with momentum, bf16 autocast on a GPU (fp32 on the CPU), channels_last;
no data pipeline, so the figures are the model's. The split sides are raydist.parallel.pipeline.Pipeline, what
`--model-parallel K --micro-batches M` trains, with the stage boundaries of each --balance (params: equal
parameter counts; time: equal forward+backward time per unit, measured first). Each measurement is --steps
training steps after --warmup steps; --repeats measurements per side, the sides interleaved, median reported,
with each device's peak memory. Stages on one device (--stage-devices cuda:0 cuda:0) measure what splitting
the batch into micro-batches costs, with no overlap to gain.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch

from bench_env import describe, environment


def build(model: str, classes: int, *, stages: list[torch.device], micro_batches: int, balance: str,
          sample: torch.Tensor, amp) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    """(the model, what runs it: itself or its Pipeline, the units of each stage: "stem..layer3.0 / ...")."""
    from raydist.models.registry import create_model
    from raydist.parallel.pipeline import Pipeline, pipeline_units, unit_costs

    torch.manual_seed(0)
    net = create_model(model, num_classes=classes).to(stages[0], memory_format=torch.channels_last)
    if len(stages) == 1:
        return net, net, "—"
    units = pipeline_units(net)
    micro_batch = sample[:math.ceil(len(sample) / micro_batches)]  # time: measured at the size the stages run
    costs = unit_costs(units, balance=balance, sample=micro_batch, autocast_dtype=amp)
    pipe = Pipeline(units, costs=costs, devices=stages, micro_batches=micro_batches)
    return net, pipe, " / ".join(f"{names[0]}..{names[-1]}" for names in pipe.stage_units)


def _synchronize(devices) -> None:
    for device in {d for d in devices if d.type == "cuda"}:
        torch.cuda.synchronize(device)


def images_per_s(runner: torch.nn.Module, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                 devices: list[torch.device], steps: int, warmup: int, amp) -> float:
    fused = True if devices[0].type == "cuda" else None
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-5, fused=fused)
    criterion = torch.nn.CrossEntropyLoss()
    seconds = 0.0
    for phase, count in (("warmup", warmup), ("measured", steps)):
        _synchronize(devices)
        t0 = time.perf_counter()
        for _ in range(count):
            with torch.autocast(devices[0].type, dtype=amp, enabled=amp is not None):
                loss = criterion(runner(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _synchronize(devices)
        seconds = time.perf_counter() - t0
    return steps * len(x) / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50_imagenet")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=128, help="images per training step (one worker's batch)")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="micro-batch counts of the split sides (1: the naive split)")
    parser.add_argument("--balance", nargs="+", default=["time", "params"], choices=["params", "time"])
    parser.add_argument("--stage-devices", nargs="+", default=None,
                        help="one device per stage (default: cuda:0 cuda:1; --smoke: cpu cpu)")
    parser.add_argument("--steps", type=int, default=20, help="measured training steps per side")
    parser.add_argument("--warmup", type=int, default=5, help="steps before each measurement (cuDNN's search)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per side (interleaved; median)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads on a CPU")
    parser.add_argument("--smoke", action="store_true", help="CPU, 32 px, batch 8, 1 step: checks that it runs")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.batch, args.steps, args.warmup, args.repeats = 32, 8, 1, 1, 1
        args.micro_batches, args.balance = [1, 2], ["params"]
        args.stage_devices = args.stage_devices or ["cpu", "cpu"]
    stages = [torch.device(d) for d in (args.stage_devices or ["cuda:0", "cuda:1"])]
    if any(d.type == "cuda" for d in stages):
        visible = torch.cuda.device_count()
        if max(d.index or 0 for d in stages) >= visible:
            sys.exit(f"--stage-devices {' '.join(map(str, stages))}: this machine has {visible} GPU(s); on one GPU "
                     f"pass --stage-devices cuda:0 cuda:0 (the micro-batches' cost), or --smoke on the CPU")
        from raydist.config.fields import TrainConfig
        from raydist.loop.recipe import apply_device_settings

        apply_device_settings(TrainConfig(), stages[0])  # the loop's own: cuDNN autotune, TF32
    torch.set_num_threads(args.threads)
    env = environment(sys.argv)
    if stages[0].type == "cuda":
        env["device"] = sorted({torch.cuda.get_device_name(d) for d in stages})
    amp = torch.bfloat16 if stages[0].type == "cuda" else None
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=generator).to(stages[0])
    x = x.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, args.classes, (args.batch,), generator=generator)

    sides = [("unsplit", 1, "params")] + [("split" if m == 1 else "pipelined", m, b)
                                          for b in args.balance for m in args.micro_batches]
    measured: dict[int, list[float]] = {i: [] for i in range(len(sides))}
    described, memory = {}, {}
    for repeat in range(args.repeats):
        order = range(len(sides)) if repeat % 2 == 0 else reversed(range(len(sides)))
        for i in order:
            name, micro, balance = sides[i]
            devices = stages[:1] if name == "unsplit" else stages
            for d in {d for d in devices if d.type == "cuda"}:
                torch.cuda.reset_peak_memory_stats(d)
            net, runner, described[i] = build(args.model, args.classes, stages=devices, micro_batches=micro,
                                              balance=balance, sample=x, amp=amp)
            measured[i].append(images_per_s(runner, net, x, labels.to(devices[-1]), devices=devices,
                                            steps=args.steps, warmup=args.warmup, amp=amp))
            memory[i] = {str(d): round(torch.cuda.max_memory_allocated(d) / 2**30, 2)
                         for d in devices if d.type == "cuda"}
            del net, runner
    baseline = statistics.median(measured[0])
    rows = []
    for i, (name, micro, balance) in enumerate(sides):
        rate = statistics.median(measured[i])
        rows.append({"side": name, "stages": 1 if name == "unsplit" else len(stages), "micro_batches": micro,
                     "balance": None if name == "unsplit" else balance, "img_s": rate, "vs_unsplit": rate / baseline,
                     "split": described[i], "peak_memory_gib": memory[i], "values": measured[i]})
    print(describe(env) + (f"; {', '.join(env['device'])}" if "device" in env else "") +
          f"; {args.model} at {args.size} px, batch {args.batch}, {args.steps} steps x {args.repeats}, "
          f"{'bf16 autocast' if amp else 'fp32'}, stages on {' '.join(map(str, stages))}")
    print("| side | stages | micro-batches | balance | stage units | img/s | vs unsplit | peak memory per GPU (GiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        peak = ", ".join(f"{v:.1f}" for v in row["peak_memory_gib"].values()) or "—"
        print(f"| {row['side']} | {row['stages']} | {row['micro_batches']} | {row['balance'] or '—'} | "
              f"{row['split']} | {row['img_s']:,.1f} | {row['vs_unsplit']:.2f} | {peak} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": env, "settings": vars(args), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
