"""Run raydist's real worker loop as N gloo DDP processes on this machine, without Ray.

    history = run_ddp(cfg, run_dir, world_size=2)                 # rank 0's per-epoch metrics
    history = run_ddp(cfg, run_dir, world_size=2, resume_from=run_dir_of_earlier / "epoch_0001")

Rank 0 writes what a Ray run writes: `epoch_NNNN/checkpoint.pt` for every checkpoint it reports and
`model_final.pt`. The loop, its DDP wrapper and its collectives are exactly those of a Ray Train worker;
only process start-up differs, which is what makes these tests take seconds instead of a cluster start.
"""

import os
import shutil
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, config: dict, run_dir: str, port: int, resume_from) -> None:
    from raydist.config import TrainConfig
    from raydist.engine import CHECKPOINT_FILE, WorkerContext, load_checkpoint_file, run

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        def report(metrics, checkpoint_folder):
            if checkpoint_folder:  # rank 0 only, as with Ray; the report owns the folder
                shutil.copytree(checkpoint_folder, os.path.join(run_dir, f"epoch_{metrics['epoch']:04d}"))
                shutil.rmtree(checkpoint_folder)

        def write_file(name, data):
            with open(os.path.join(run_dir, name), "wb") as fh:
                fh.write(data)

        resume_state = load_checkpoint_file(os.path.join(resume_from, CHECKPOINT_FILE)) if resume_from else None
        ctx = WorkerContext(rank=rank, world_size=world_size, device=torch.device("cpu"), report=report,
                            write_file=write_file, resume_state=resume_state)
        history = run(TrainConfig.from_dict(config), ctx)
        if rank == 0:
            torch.save(history, os.path.join(run_dir, "history.pt"))
        dist.barrier()  # no rank tears gloo down while another still uses it (that aborts the process)
    finally:
        dist.destroy_process_group()
    # Done, and every file is closed. Leave without the interpreter's teardown: gloo's C++ threads, destroyed
    # there in no fixed order, now and then abort a finished process ("terminate called without an active
    # exception", SIGABRT), which mp.spawn reports as a failure of a run that succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ddp(cfg, run_dir, *, world_size: int = 2, resume_from=None) -> list[dict]:
    """Train `cfg` on `world_size` gloo processes; return rank 0's history."""
    run_dir = str(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    mp.spawn(_worker, args=(world_size, cfg.to_dict(), run_dir, _free_port(),
                            str(resume_from) if resume_from else None), nprocs=world_size, join=True)
    return torch.load(os.path.join(run_dir, "history.pt"), weights_only=False)
