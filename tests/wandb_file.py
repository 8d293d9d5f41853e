"""Reading back what W&B wrote, from its own run file (no W&B server, no key)."""

import json
import struct


def read_wandb_history(run_file: str) -> list[dict]:
    """The `history` records of a W&B run file (.wandb): W&B's LevelDB-style log of 32 KiB blocks, each record
    a 7-byte header (CRC, length, type: 1 full, 2 first, 3 middle, 4 last) and a protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # the block's padding
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    history = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
    return history
