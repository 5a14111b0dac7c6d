"""Run under torchrun (2 processes, gloo): each rank reads finite passes of the shard stream.

Writes OUT/rank<R>.json with the keys and batch counts of three passes (seed 0, seed 0
again with fresh worker processes, seed 1), each read with 2 DataLoader workers. The
batch counts are also all-reduced (min and max), as DDP would meet them.

With FEW_SHARDS_DIR (fewer shards than the 2 x 4 slots), it also reads two epochs of that
dataset with 4 workers, batch 1 and no shuffle, recording per batch the worker, epoch, key
and the bytes read; every decode in every worker appends its key to OUT/decoded/.

    torchrun --nproc_per_node 2 stream_probe.py DATASET_DIR OUT_DIR [FEW_SHARDS_DIR]
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from gan_dist.data.stream import make_loader, open_dataset


def read_once(data_dir: str, out_dir: Path, rank: int, world_size: int) -> list:
    import os

    from gan_dist.data import reader

    decoded_dir = out_dir / "decoded"
    decoded_dir.mkdir(parents=True, exist_ok=True)
    decode = reader.decode

    def logged(raw, *args):  # runs in the (forked) workers
        with open(decoded_dir / f"{rank}-{os.getpid()}.txt", "a") as log:
            log.write(raw["__key__"] + "\n")
        return decode(raw, *args)

    reader.decode = logged
    loader = make_loader(open_dataset(data_dir), 1, 0, rank, num_workers=4, shuffle_buffer=1,
                         world_size=world_size, num_epochs=2)
    # The DataLoader itself: FinitePass would cut every rank to the smallest rank's batch count.
    return [(b.worker, b.epoch, int(b.keys[0]), b.read_bytes) for b in loader.loader if len(b.keys)]


def main() -> None:
    data_dir, out_dir = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    info = open_dataset(data_dir)
    result = {"world_size": world_size}
    for name, seed in (("first", 0), ("again", 0), ("other_seed", 1)):
        loader = make_loader(info, 16, seed, rank, num_workers=2, shuffle_buffer=50, world_size=world_size, num_epochs=1)
        batches = [b for b in loader if len(b.keys)]
        counts = torch.tensor([len(batches), -len(batches)])
        dist.all_reduce(counts, op=dist.ReduceOp.MIN)
        result[name] = {"keys": [int(k) for b in batches for k in b.keys], "batches": len(batches),
                        "min_batches": int(counts[0]), "max_batches": int(-counts[1])}
    if len(sys.argv) > 3:
        result["read_once"] = read_once(sys.argv[3], out_dir, rank, world_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
