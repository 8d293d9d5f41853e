"""Ray Data's map function of the streamed image-folder path: read and decode a batch of files on the node
it runs on. Kept apart from torch and from raydist.ray_edge.stream so a fresh Ray worker process starts it
in a fraction of a second.
"""

from __future__ import annotations

import numpy as np

from raydist.data.folder import decode_image, folder_filesystem


def decode_files(batch: dict, *, root: str, stored: int) -> dict:
    """Ray Data map function of the streamed path (raydist.ray_edge.stream): read and decode a batch of files
    on the node it runs on. Kept in this module, which does not import torch, so that a fresh Ray worker
    process starts it in a fraction of a second."""
    import ray  # RAY: the node that decoded (the run log says where its first epoch was decoded)

    fs, base = folder_filesystem(root)
    images = np.zeros((len(batch["path"]), 3, stored, stored), dtype=np.uint8)
    ok = np.zeros(len(batch["path"]), dtype=bool)
    for i, path in enumerate(batch["path"]):
        try:
            with fs.open_input_stream(f"{base}/{path}") as stream:
                images[i] = decode_image(stream.read(), stored)
            ok[i] = True
        except Exception:  # noqa: BLE001 - counted and named by the rank that reads the batch
            pass
    node = ray.get_runtime_context().get_node_id()
    return {"image": images, "label": np.asarray(batch["label"], dtype=np.int64), "ok": ok,
            "path": np.asarray([str(p) for p in batch["path"]]), "node": np.asarray([node] * len(ok))}
