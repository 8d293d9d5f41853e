"""raydist's loop against the plain Ray-docs way of training on Ray Train, same model, data and workers, side by
side in one run: steady training throughput of each.

    python benchmarks/ray_docs_peer.py [--epochs 6] [--repeats 3] [--workers 2] [--address HOST:PORT] [--json F]

Both sides are TorchTrainer runs of --workers CPU workers (1 CPU each, gloo) training resnet8 on digits with
a per-worker batch of 64, SGD (momentum 0.9, Nesterov, weight decay 5e-4), fp32:
- raydist: `raydist.ray_edge.fit.fit` (what `python -m raydist.train` runs): uint8 data in memory, crop+flip in
  batches, the epoch's indices drawn once, metrics summed on the device and all-reduced once per epoch;
- Ray docs: the train function of Ray Train's PyTorch guide: a Dataset of PIL images with per-image
  torchvision transforms (RandomCrop(32, padding 4), RandomHorizontalFlip, ToTensor, Normalize) in a
  DataLoader (batch 64, shuffle, --loader-workers processes, 0 as in the guide), prepared with
  `ray.train.torch.prepare_data_loader` (a DistributedSampler) and `prepare_model` (DDP), one report per epoch.
Throughput of an epoch = the images all workers trained on / the mean worker's seconds in its training loop
(the same definition as raydist's images_per_s); steady = the median over epochs 2 and later. Runs alternate
sides (raydist first in odd repeats); the ratio is taken within each pair and reported as median (min-max).
Without --address the script starts one local cluster for all runs: start no other Ray instance meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from bench_env import describe, environment, load_average, spread, steady, summary
from raydist.preflight import validate

BATCH = 64
MEAN, STD = (0.305,) * 3, (0.324,) * 3  # raydist's digits statistics


def ray_docs_train_func(config: dict) -> None:
    """The Ray Train guide's loop, with digits as the data set."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from PIL import Image
    from torchvision import transforms

    from raydist.data.sources import load_split
    from raydist.models.registry import create_model

    torch.set_num_threads(1)
    split = load_split("digits", "train")
    images = split.images.permute(0, 2, 3, 1).contiguous().numpy()  # N x H x W x C uint8
    labels = split.labels.numpy()
    transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(MEAN, STD)])

    class Digits(torch.utils.data.Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return transform(Image.fromarray(images[i])), int(labels[i])

    loader = torch.utils.data.DataLoader(Digits(), batch_size=BATCH, shuffle=True, drop_last=True,
                                         num_workers=config["loader_workers"])
    loader = ray.train.torch.prepare_data_loader(loader)
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(create_model("resnet8", num_classes=10))
    world = ray.train.get_context().get_world_size()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.4 * BATCH * world / 256, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    criterion = torch.nn.CrossEntropyLoss()
    throughput = []
    for epoch in range(config["epochs"]):
        if world > 1:
            loader.sampler.set_epoch(epoch)
        model.train()
        seen, t0 = 0, time.perf_counter()
        for x, y in loader:
            loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(y)
        seconds = time.perf_counter() - t0
        totals = torch.tensor([seen, seconds], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(totals)
        throughput.append(totals[0].item() / (totals[1].item() / world))
        ray.train.report({"epoch": epoch + 1, "images_per_s": throughput[-1]})
    return throughput  # Result.metrics is empty for a run that reports no checkpoint (Ray 2.60)


def ray_docs_run(epochs: int, workers: int, loader_workers: int, folder: str) -> list[float]:
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(ray_docs_train_func, train_loop_config={"epochs": epochs, "loader_workers": loader_workers},
                           scaling_config=ray.train.ScalingConfig(num_workers=workers,
                                                                  resources_per_worker={"CPU": 1}),
                           run_config=ray.train.RunConfig(name="ray-docs", storage_path=folder))
    return trainer.fit().return_value


def raydist_run(epochs: int, workers: int, folder: str, address) -> list[float]:
    from raydist.config.fields import TrainConfig
    from raydist.ray_edge.fit import fit
    from raydist.run_config import prepare

    # 32 px with crop + flip: the Ray-docs side's RandomCrop(32) and RandomHorizontalFlip, not digits' own 16 px
    cfg = TrainConfig(epochs=epochs, num_workers=workers, batch_size=BATCH, cpus_per_worker=1.0, address=address,
                      storage_path=folder, name="raydist", warmup_epochs=0.0, input_size=32, augment="crop_flip")
    validate(cfg)
    summary_ = fit(prepare(cfg, explicit={}))
    return [h["images_per_s"] for h in summary_.history]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run (the first is left out)")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes of the Ray-docs side")
    parser.add_argument("--address", help="a running cluster to use (default: start a local one)")
    parser.add_argument("--json", default="", help="write the raw results here")
    args = parser.parse_args()
    env = environment(sys.argv)
    from raydist.ray_edge import session

    session.connect(args.address)
    pairs = []
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            order = ("raydist", "ray_docs") if repeat % 2 == 0 else ("ray_docs", "raydist")
            pair = {"order": order}
            for side in order:
                folder = os.path.join(scratch, f"{repeat}-{side}")
                load_before = load_average()
                per_epoch = (raydist_run(args.epochs, args.workers, folder, args.address) if side == "raydist"
                             else ray_docs_run(args.epochs, args.workers, args.loader_workers, folder))
                pair[side] = {"images_per_s": per_epoch, "steady": steady(per_epoch), "load_before": load_before,
                              "load_after": load_average()}
            pair["ratio"] = pair["raydist"]["steady"] / pair["ray_docs"]["steady"]
            pairs.append(pair)
            print(f"pair {repeat + 1} ({' then '.join(order)}): raydist {pair['raydist']['steady']:,.0f} img/s, "
                  f"Ray docs {pair['ray_docs']['steady']:,.0f} img/s, ratio {pair['ratio']:.3f}", flush=True)
    result = {"ratio": summary([p["ratio"] for p in pairs], 3),
              "raydist": summary([p["raydist"]["steady"] for p in pairs], 1),
              "ray_docs": summary([p["ray_docs"]["steady"] for p in pairs], 1)}
    env["load_average_end"] = load_average()
    print(describe(env) + f"; load average at end {env['load_average_end']}")
    print(f"resnet8 on digits, {args.workers} workers x 1 CPU, batch {BATCH}/worker, {args.epochs} epochs per run, "
          f"{args.repeats} pairs, Ray-docs DataLoader workers {args.loader_workers}")
    print(f"steady training images/s: raydist {spread(result['raydist'], '{:,.0f}')}, Ray docs "
          f"{spread(result['ray_docs'], '{:,.0f}')}; ratio raydist / Ray docs {spread(result['ratio'], '{:.3f}')}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": env, "settings": vars(args), "pairs": pairs, "result": result}, fh, indent=1)


if __name__ == "__main__":
    main()
