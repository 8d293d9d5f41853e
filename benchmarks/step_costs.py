"""Three fixed costs of the loop, each against what it replaced, side by side: generating a `fake` batch,
what a checkpoint holds training up for, and DDP's per-forward BatchNorm broadcast.

    python benchmarks/step_costs.py [--models resnet18 wrn28_10 resnet50_imagenet] [--repeats 5] [--json F]

fake: milliseconds to generate one batch of --fake-batch 3x224x224 fake images (the DDP workload test's data)
  with raydist's generator (per-pixel hash in int32) against the int64 hash it replaced (the same images,
  bit for bit), on this device, --threads threads.
checkpoint: per model, the checkpoint's size (weights, SGD momentum, scaler) and the seconds rank 0 is held
  up at an epoch end: serialising it into a local folder (what remains with Ray's asynchronous upload)
  against serialising it and then copying it into the run folder in storage (what a synchronous upload
  adds; here the storage is a local folder, so an upload to S3 adds more). Median of --repeats.
ddp: steady training images/s of raydist's loop (raydist.loop.run.run) as 2 gloo DDP processes of 1 thread,
  resnet8 on digits, batch 64 per worker, --ddp-epochs epochs (the first left out), with DDP's broadcast of
  rank 0's BatchNorm buffers before every forward (DDP's default, raydist before) and without it (raydist
  now), --ddp-repeats pairs, the order alternating; the ratio is taken within a pair.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

from bench_env import describe, environment, steady
from raydist.preflight import validate


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fake_cost(batch: int, repeats: int, device: torch.device) -> dict:
    from raydist.data.sources import FAKE_SPLITS, FakeSource, _hash32

    source = FakeSource(100_000, 224, 1000, salt=0, device=device)
    indices = torch.arange(batch, device=device)

    def int64_reference():
        image_id = indices * len(FAKE_SPLITS)
        key_a, key_b = _hash32(image_id * 2 + 0x9E37), _hash32(image_id * 2 + 0x79B9 + 1)
        offsets = torch.arange(3 * 224 * 224, device=device, dtype=torch.int64)
        return (_hash32(_hash32(offsets[None, :] + key_a[:, None]) ^ key_b[:, None]) & 255).to(torch.uint8)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    assert torch.equal(source.batch(indices)[0].flatten(1), int64_reference())
    ours = _median_seconds(lambda: (source.batch(indices), sync()), repeats)
    before = _median_seconds(lambda: (int64_reference(), sync()), repeats)
    return {"batch": batch, "int32_ms": ours * 1e3, "int64_ms": before * 1e3, "speedup": before / ours}


def checkpoint_cost(model: str, repeats: int) -> dict:
    from raydist.config.fields import TrainConfig
    from raydist.data.sources import TensorSource
    from raydist.runs.checkpoints import CHECKPOINT_FILE
    from raydist.loop.state import TrainingState

    size = 224 if model.endswith("_imagenet") else 32
    cfg = validate(TrainConfig(dataset="cifar10", model=model, num_workers=1, batch_size=2, warmup_epochs=0))
    data = TensorSource(torch.zeros(4, 3, size, size, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    state = TrainingState(cfg, device=torch.device("cpu"), rank=0, world=1, train_set=data, val_set=data)
    state.enter_epoch(0)
    state.train_epoch()  # momentum buffers exist, as at any real epoch end
    with tempfile.TemporaryDirectory() as scratch:
        storage = os.path.join(scratch, "storage")

        def serialise() -> str:
            folder = tempfile.mkdtemp(dir=scratch)
            torch.save(state.state_dict({"epoch": 1}), os.path.join(folder, CHECKPOINT_FILE))
            return folder

        def serialise_and_copy():
            folder = serialise()
            shutil.rmtree(storage, ignore_errors=True)
            shutil.copytree(folder, storage)
            shutil.rmtree(folder)

        async_s = _median_seconds(lambda: shutil.rmtree(serialise()), repeats)
        sync_s = _median_seconds(serialise_and_copy, repeats)
        megabytes = os.path.getsize(os.path.join(storage, CHECKPOINT_FILE)) / 1e6
    return {"model": model, "megabytes": megabytes, "async_s": async_s, "sync_s": sync_s}


def _ddp_worker(rank: int, world: int, sync: bool, port: int, epochs: int, out: str) -> None:
    import torch.distributed as dist

    import raydist.loop.run as engine
    from raydist.config.fields import TrainConfig

    if sync:  # DDP's default: rank 0's buffers broadcast before every forward
        engine.NO_FORWARD_BUFFER_SYNC = {}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = validate(TrainConfig(epochs=epochs, num_workers=world, batch_size=64, cpus_per_worker=1.0, warmup_epochs=0))
    ctx = engine.WorkerContext(rank=rank, world_size=world, device=torch.device("cpu"),
                               report=lambda metrics, folder: folder and shutil.rmtree(folder),
                               write_file=lambda name, data: None)
    history = engine.run(cfg, ctx)
    if rank == 0:
        torch.save([m["images_per_s"] for m in history], out)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # as tests/local_ddp.py: gloo's teardown at interpreter exit can abort a finished process


def ddp_buffer_sync_cost(epochs: int, repeats: int) -> dict:
    import socket

    import torch.multiprocessing as mp

    measured = {"broadcast": [], "none": []}
    for repeat in range(repeats):
        for sync in ((True, False) if repeat % 2 == 0 else (False, True)):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            with tempfile.TemporaryDirectory() as scratch:
                out = os.path.join(scratch, "images_per_s.pt")
                mp.spawn(_ddp_worker, args=(2, sync, port, epochs, out), nprocs=2, join=True)
                per_epoch = torch.load(out)
            measured["broadcast" if sync else "none"].append(steady(per_epoch))
    ratios = [a / b for a, b in zip(measured["none"], measured["broadcast"])]
    return {**measured, "ratios": ratios, "ratio": statistics.median(ratios)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "wrn28_10", "resnet50_imagenet"])
    parser.add_argument("--fake-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ddp-epochs", type=int, default=6)
    parser.add_argument("--ddp-repeats", type=int, default=3)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    env = environment(sys.argv)
    torch.set_num_threads(args.threads)
    fake = fake_cost(args.fake_batch, args.repeats, torch.device(args.device))
    print(f"fake 3x224x224, batch {fake['batch']} on {args.device}: int32 {fake['int32_ms']:.1f} ms, int64 (before) "
          f"{fake['int64_ms']:.1f} ms, {fake['speedup']:.2f}x", flush=True)
    checkpoints = []
    for model in args.models:
        row = checkpoint_cost(model, args.repeats)
        checkpoints.append(row)
        print(f"checkpoint of {model}: {row['megabytes']:.0f} MB; rank 0 held up {row['async_s']:.3f} s with the "
              f"upload in the background, {row['sync_s']:.3f} s with a synchronous copy to local storage", flush=True)
    ddp = ddp_buffer_sync_cost(args.ddp_epochs, args.ddp_repeats)
    print(f"2 gloo workers, resnet8 on digits: {statistics.median(ddp['none']):,.0f} img/s without the per-forward "
          f"buffer broadcast, {statistics.median(ddp['broadcast']):,.0f} with it; ratio without / with "
          f"{ddp['ratio']:.3f} (pairs: {', '.join(f'{r:.3f}' for r in ddp['ratios'])})", flush=True)
    print(describe(env) + f"; {args.threads} thread(s)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": env, "settings": vars(args), "fake": fake, "checkpoints": checkpoints,
                       "ddp_buffer_sync": ddp}, fh, indent=1)


if __name__ == "__main__":
    main()
