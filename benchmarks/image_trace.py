"""Which images each rank trained on, for audits of elastic resizes and resumes: a micro-batch hook.

    RAYDIST_MICRO_BATCH_HOOK=image_trace:record RAYDIST_IMAGE_TRACE=/tmp/trace \
        PYTHONPATH=benchmarks python -m raydist.train ...       # every worker appends what it trained on
    records = read("/tmp/trace")                                # then: count each image of an epoch

raydist calls the hook (raydist.loop.context.MICRO_BATCH_HOOK_ENV) with every micro-batch a rank trains
on; `record` appends one JSON line per call (pid, epoch, the step's end position, world size, rank, image
indices) to a file of its process inside RAYDIST_IMAGE_TRACE. The tests and benchmarks/elastic_digits.py
use it; a worker process must be able to import this module (PYTHONPATH on every node).
"""

import json
import os

TRACE_ENV = "RAYDIST_IMAGE_TRACE"  # the folder the records go to
HOOK = "image_trace:record"  # what RAYDIST_MICRO_BATCH_HOOK is set to


def record(*, epoch: int, end: int, world: int, rank: int, indices: list) -> None:
    folder = os.environ[TRACE_ENV]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"trace-{os.getpid()}.jsonl"), "a") as fh:
        fh.write(json.dumps({"pid": os.getpid(), "epoch": epoch, "end": end, "world": world, "rank": rank,
                             "indices": indices}) + "\n")


def read(folder) -> list[dict]:
    """Every record written into `folder`, all processes' files together (a missing folder: none)."""
    folder = str(folder)
    records = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.startswith("trace-") and name.endswith(".jsonl"):
            with open(os.path.join(folder, name)) as fh:
                records += [json.loads(line) for line in fh]
    return records


def environment(folder) -> dict:
    """The variables that make every worker started with them (and their nodes' raylets) record into `folder`."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    return {"RAYDIST_MICRO_BATCH_HOOK": HOOK, TRACE_ENV: str(folder), "PYTHONPATH": path}
