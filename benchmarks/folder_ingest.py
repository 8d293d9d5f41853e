"""Images per second delivered to one training worker from a folder of JPEGs, three ways side by side, and
the streamed path's memory for a folder and one 4x larger.

    python benchmarks/folder_ingest.py [--images 20000] [--sizes 224 320] [--rounds 3] [--json docs/folder_ingest.json]

The folder (written once into --folder, default /tmp/raydist-folder-ingest: --images JPEGs of random sizes
in --sizes, 10 classes, quality 90, smooth random content so that they compress like photos) is read by:
- stream:     raydist's streamed path (raydist.ray_edge.stream.StreamSource on a local Ray cluster of every
              core: Ray Data tasks read and decode, the worker iterates batches with prefetching);
- memory:     raydist's in-memory path once its node cache exists (raydist.data.folder.load_folder_split
              from the cache, then batches indexed from the uint8 tensor);
- dataloader: what users write today: torchvision ImageFolder + DataLoader(num_workers=cores,
              pin_memory on a GPU, persistent workers) + per-image RandomResizedCrop(224), flip, ToTensor,
              Normalize.
raydist's two paths apply their augmentation on the device (resized_crop + flip + normalize, batched), so
every pipeline hands the step the same thing: a normalized float batch of 64 x 3 x 224 x 224. Each round
times one epoch of each pipeline (order rotated per round, warm-up epoch first); ratios within a round.

Memory: how far the resident memory of this process (the worker's role) and the machine's used memory
(this process, Ray's workers and object store) rise above where they were while the streamed path reads
the folder, and while it reads the same folder listed 4 times (a folder 4x larger: the same files, four
times as many rows), against the memory path's decoded size. The memory path's copy is freed first.
"""

import argparse
import gc
import json
import os
import sys
import threading
import time

import numpy as np
import torch

from bench_env import describe, environment, summary

BATCH = 64
INPUT = 224


def write_folder(root: str, images: int, sizes: list[int], seed: int = 0) -> None:
    from PIL import Image

    done = os.path.join(root, ".complete")
    if os.path.exists(done) and open(done).read() == f"{images} {sizes}":
        return
    rng = np.random.default_rng(seed)
    for i in range(images):
        folder = os.path.join(root, f"class_{i % 10}")
        os.makedirs(folder, exist_ok=True)
        w, h = (int(rng.integers(sizes[0], sizes[-1] + 1)) for _ in range(2))
        small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)  # smooth: upscaled noise
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)
    with open(done, "w") as fh:
        fh.write(f"{images} {sizes}")


def used_memory() -> int:
    with open("/proc/meminfo") as fh:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
    return info["MemTotal"] - info["MemAvailable"]


def own_rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakUsed:
    """The machine's used memory and this process's resident memory, sampled every 50 ms: their peaks
    above the levels at the start."""

    def __enter__(self):
        self.start, self.rss_start, self.running = used_memory(), own_rss(), True
        self.peak, self.rss_peak = self.start, self.rss_start
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak, self.rss_peak = max(self.peak, used_memory()), max(self.rss_peak, own_rss())
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.growth, self.rss_growth = self.peak - self.start, self.rss_peak - self.rss_start


def epoch_stream(source, augment, device, epoch):
    from raydist.data.splits import shard_indices

    batches = list(shard_indices(len(source), batch_size=BATCH, rank=0, world_size=1, epoch=epoch, seed=0))
    count = 0
    for images, _ in source.batches(batches, train=True, shuffle_seed=epoch):
        x = augment(images.to(device), train=True)
        count += len(x)
    return count


def epoch_memory(source, augment, device, epoch):
    from raydist.data.splits import shard_indices

    count = 0
    for indices in shard_indices(len(source), batch_size=BATCH, rank=0, world_size=1, epoch=epoch, seed=0,
                                 device=device):
        images, _ = source.batch(indices)
        x = augment(images, train=True)
        count += len(x)
    return count


def epoch_dataloader(loader, device):
    count = 0
    for x, _ in loader:
        x = x.to(device, non_blocking=True)
        count += len(x)
    return count


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--sizes", type=int, nargs=2, default=[224, 320])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--folder", default="/tmp/raydist-folder-ingest")
    parser.add_argument("--address", help="a Ray cluster to stream on (default: start one of every core here)")
    parser.add_argument("--json")
    args = parser.parse_args()
    env = environment(sys.argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)

    t0 = time.perf_counter()
    write_folder(args.folder, args.images, args.sizes)
    print(f"folder: {args.images} JPEGs of {args.sizes[0]}-{args.sizes[1]} px in {args.folder} "
          f"({time.perf_counter() - t0:.0f} s to write or check)", flush=True)

    import ray
    from torchvision import datasets, transforms

    from raydist.data.augment import Augmenter
    from raydist.ray_edge.stream import StreamSource
    from raydist.data.sources import TensorSource
    from raydist.data.folder import (IMAGENET_MEAN, IMAGENET_STD, decoded_bytes, load_folder_split, scan_folder,
                                     stored_size)

    os.environ.setdefault("RAYDIST_CACHE_DIR", os.path.join(args.folder + "-cache"))
    index = scan_folder(args.folder, val_fraction=0.1)  # the training split is what is read
    stored = stored_size(INPUT)
    t0 = time.perf_counter()
    images, labels, report = load_folder_split(index, "train", stored=stored)
    first_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    images, labels, report = load_folder_split(index, "train", stored=stored)
    cached_load = time.perf_counter() - t0
    memory_source = TensorSource(images, labels).to(device)
    print(f"memory path: decode {first_load:.1f} s (or from the cache), then {cached_load:.1f} s from the cache; "
          f"{decoded_bytes(index, stored) / 2**30:.2f} GiB decoded", flush=True)

    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    stream_source = StreamSource(index, "train", stored=stored, device=device)
    augment = Augmenter("resized_crop", mean=IMAGENET_MEAN, std=IMAGENET_STD, device=device, crop=INPUT)
    baseline = datasets.ImageFolder(args.folder, transform=transforms.Compose([
        transforms.RandomResizedCrop(INPUT), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]))
    loader = torch.utils.data.DataLoader(baseline, batch_size=BATCH, shuffle=True, num_workers=cores,
                                         pin_memory=device.type == "cuda", persistent_workers=True, drop_last=True)
    runs = {"stream": lambda e: epoch_stream(stream_source, augment, device, e),
            "memory": lambda e: epoch_memory(memory_source, augment, device, e),
            "dataloader": lambda e: epoch_dataloader(loader, device)}
    for name, run in runs.items():  # warm-up: Ray's workers, the DataLoader's processes, the page cache
        run(0)
    rates = {name: [] for name in runs}
    names = list(runs)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            n = runs[name](r + 1)
            rates[name].append(n / (time.perf_counter() - t0))
        print(f"round {r + 1}: " + ", ".join(f"{n} {rates[n][-1]:,.0f} img/s" for n in names), flush=True)
    ratios = {f"{a}/dataloader": summary([x / y for x, y in zip(rates[a], rates["dataloader"])])
              for a in ("stream", "memory")}

    # Memory while streaming the folder, and the folder listed 4 times (4x the rows, the same files).
    del memory_source, images, runs
    gc.collect()
    memory = {}
    for factor in (1, 4):
        source = StreamSource(index, "train", stored=stored, device=device)
        source.files = source.files * factor
        with PeakUsed() as peak:
            epoch_stream(source, augment, device, 10 + factor)
        memory[f"{factor}x"] = {"images": len(source.files), "machine_used_growth_gib": peak.growth / 2**30,
                                "worker_rss_growth_gib": peak.rss_growth / 2**30,
                                "decoded_size_gib": len(source.files) * 3 * stored * stored / 2**30}
        print(f"streaming {factor}x ({len(source.files)} images, {memory[f'{factor}x']['decoded_size_gib']:.1f} GiB "
              f"decoded): at their peaks the machine's used memory grew {peak.growth / 2**30:.2f} GiB, this "
              f"process's resident memory {peak.rss_growth / 2**30:.2f} GiB", flush=True)
    ray.shutdown()
    result = {"environment": env, "machine": describe(env), "device": str(device),
              "images": len(index.splits["train"]), "sizes": args.sizes, "batch": BATCH, "input": INPUT,
              "rates": {n: summary(v) for n, v in rates.items()}, "ratios": ratios,
              "memory_path_seconds": {"first_load": first_load, "cached_load": cached_load}, "streaming_memory": memory}
    for name, s in ratios.items():
        print(f"{name}: {s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
