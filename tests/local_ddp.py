"""Run raydist's real worker loop as N gloo DDP processes on this machine, without Ray.

    history = run_ddp(cfg, run_dir, world_size=2)                 # rank 0's per-epoch metrics
    history = run_ddp(cfg, run_dir, world_size=2, resume_from=run_dir_of_earlier / "checkpoint_epoch_0001")

Rank 0 writes what a Ray run writes: `checkpoint_epoch_NNNN/checkpoint.pt` for every checkpoint it reports and
`model_final.pt`. The loop, its DDP wrapper and its collectives are exactly those of a Ray Train worker;
only process start-up differs, which is what makes these tests take seconds instead of a cluster start.

The processes are forked from one server process (multiprocessing's forkserver) that imported torch and
raydist's loop once per test session: a spawned interpreter paid those imports (about 3 s of CPU each, torch's
first optimizer importing torch._dynamo among them) for every process of every run. The server itself never
computes, so its children start with no thread pools to inherit. Each worker takes the test's environment,
working folder and stdout/stderr; what a library read from the environment when it was imported is the
server's (the environment of the session's first run): no test here sets such a variable.
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


class Reclaimed(Exception):
    """The simulated spot node is gone: the run's workers stop where they are."""


def _notices(first: int):
    """A stand-in for Ray Train's preemption check: no notice for the first `first - 1` checks, a notice at
    check `first`, and at the next check the node is gone (every rank stops, as when Ray tears the group
    down): the steps between the notice's checkpoint and that check are the work a reclaim repeats."""
    import time

    calls = []

    def check():
        calls.append(1)
        if len(calls) > first:
            raise Reclaimed
        if len(calls) == first:
            return {"nodes": [("node-b", "127.0.0.2 (node-b)")], "ranks": [1], "deadline_unix": time.time() + 20}
        return None
    return check


def _worker(rank: int, world_size: int, config: dict, run_dir: str, port: int, resume_from,
            notice_at_check=None, environment=None, cwd=None, streams=None) -> None:
    # A forked worker starts with the server's environment, folder and stdout/stderr (those of the session's
    # first run): it takes the test's own, as a spawned process inherited them.
    os.environ.clear()
    os.environ.update(environment)
    os.chdir(cwd)
    for target, inherited in zip((1, 2), streams[rank]):
        os.dup2(inherited.detach(), target)
    from raydist.config.fields import TrainConfig
    from raydist.runs.checkpoints import CHECKPOINT_FILE, checkpoint_dir_name, load_checkpoint_file
    from raydist.loop.context import WorkerContext
    from raydist.loop.run import run

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        def report(metrics, checkpoint_folder):
            if checkpoint_folder:  # rank 0 only, as with Ray; the report owns the folder
                name = checkpoint_dir_name(metrics["epoch"], metrics.get("position", 0))
                shutil.copytree(checkpoint_folder, os.path.join(run_dir, name))
                shutil.rmtree(checkpoint_folder)

        def write_file(name, data):
            with open(os.path.join(run_dir, name), "wb") as fh:
                fh.write(data)

        resume_state = load_checkpoint_file(os.path.join(resume_from, CHECKPOINT_FILE)) if resume_from else None
        ctx = WorkerContext(rank=rank, world_size=world_size, device=torch.device("cpu"), report=report,
                            write_file=write_file, resume_state=resume_state,
                            preemption_info=_notices(notice_at_check) if notice_at_check else None)
        try:
            history = run(TrainConfig.from_dict(config), ctx)
        except Reclaimed:
            history = "reclaimed"
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


def _start_method() -> str:
    """"forkserver", its server preloading what every worker imports, where the platform has it."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    # Read by the server when it starts (the first run of the session). The server imports from its own
    # path (the installed raydist, PYTHONPATH); each worker then gets this process's sys.path and imports
    # this module itself. torch._dynamo: every optimizer step imports it.
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["torch", "torch._dynamo", "torch.distributed", "raydist.loop.run"])
    return "forkserver"


def _streams(world_size: int) -> list:
    """This process's stdout and stderr for each worker to take (each handed over once), so that what the
    workers print reaches the test's capture as a spawned process's output did."""
    from multiprocessing import reduction

    sys.stdout.flush()
    sys.stderr.flush()
    return [(reduction.DupFd(1), reduction.DupFd(2)) for _ in range(world_size)]


def run_ddp(cfg, run_dir, *, world_size: int = 2, resume_from=None, notice_at_check=None) -> list[dict]:
    """Train `cfg` on `world_size` gloo processes; return rank 0's history ("reclaimed" when
    `notice_at_check` N simulated a spot notice at the run's N-th preemption check and the node's loss at
    the next one)."""
    run_dir = str(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    mp.start_processes(_worker, args=(world_size, cfg.to_dict(), run_dir, _free_port(),
                                      str(resume_from) if resume_from else None, notice_at_check,
                                      dict(os.environ), os.getcwd(), _streams(world_size)),
                       nprocs=world_size, join=True, start_method=_start_method())
    return torch.load(os.path.join(run_dir, "history.pt"), weights_only=False)
