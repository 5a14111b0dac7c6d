"""`gan-dist prepare`: write a dataset as webdataset tar shards plus index.json; verify them.

Samples are written in a seeded random order over the whole dataset (`--order shuffled`, the
default): a class-sorted folder written in its own order gives shards of a few classes each,
which no shuffle buffer can mix, and an unconditional GAN then follows whichever classes it
is reading. Shards are written by `--workers` processes, one shard per job, into a temporary
directory that is renamed into place at the end: an interrupted prepare never leaves half a
dataset. Sample keys are the source index (`00000042`), so the same source and seed always
give the same bytes (tar mtime is fixed) and the same sha256s, whatever the worker count.

npy datasets are written in chunks (samples.py) of about 2 MiB by default (`--chunk`): one
tar entry per chunk of N samples. Per-sample entries cost a tar header, an npy header and a
Python object per image, which caps one reader near 10,000 images/s; a chunk costs them once
per N (docs/benchmarks.md). png/jpg stay per sample (each image is its own compressed file).

index.json lists, per shard, the byte offset where each entry (a sample, or a chunk) starts,
and where the last one ends: readers take sub-shard ranges with one seek or an HTTP Range
request, so any number of readers reads every byte once (gan_dist.data.plan); a range that
starts or ends inside a chunk reads that chunk and keeps its part.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np

from gan_dist.data import samples as samples_mod
from gan_dist.data.sources import TORCHVISION_SETS, SizeMismatch, open_source, parse_resolution
from gan_dist.errors import UserError
from gan_dist.progress import task_progress
from gan_dist.seeds import derive_seed

INDEX_FORMAT = "gan_dist.shards/4"  # /3 added the sample order, byte offsets and class counts; /4 chunks
ORDERS = ("shuffled", "source")
PREPARE_ORDER = 7  # seed purpose
MAX_SHARD_SIZE = 10_000
# An automatic chunk holds about this many bytes: large enough that per-entry costs vanish
# (bench/data_throughput.py), small enough that a worker's shuffle over 8 chunks stays small.
CHUNK_TARGET_BYTES = 2 << 20
MAX_CHUNK_ROWS = 1024
BUILTIN_DATASETS = ("digits", "ring8", "grid25", *TORCHVISION_SETS)


def shard_bounds(count: int, shard_size: int = 0) -> list[tuple[int, int]]:
    """(start, stop) of each shard. Automatic (shard_size 0): at least 8 shards (one per sample
    below 8) so that ranks and workers get shards of their own, at most 10,000 samples each,
    sizes differing by at most one (each rank's share of an epoch is whole shards)."""
    if shard_size:
        return [(start, min(start + shard_size, count)) for start in range(0, count, shard_size)]
    num_shards = min(count, max(8, math.ceil(count / MAX_SHARD_SIZE)))
    edges = [n * count // num_shards for n in range(num_shards + 1)]
    return list(itertools.pairwise(edges))


def chunk_rows(chunk: int, fmt: str, shape: tuple[int, ...], dtype: str) -> int:
    """Samples per tar entry: `chunk` as given (1: the per-sample layout), or automatic (0):
    about CHUNK_TARGET_BYTES for npy, per sample for png/jpg."""
    if chunk < 0:
        raise UserError(f"--chunk must be >= 0 (0 = automatic, 1 = one entry per sample), got {chunk}")
    if fmt != "npy":
        if chunk > 1:
            raise UserError(f"--chunk {chunk} applies to --format npy; {fmt} images are stored one per entry "
                            "(drop --chunk, or use --format npy)")
        return 1
    if chunk:
        return chunk
    sample_bytes = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
    return int(min(MAX_CHUNK_ROWS, max(1, 2 ** round(math.log2(max(1, CHUNK_TARGET_BYTES / sample_bytes))))))


def sample_order(count: int, order: str, seed: int, limit: int = 0) -> np.ndarray:
    """Source indices in the order they are written; a limit keeps a seeded random `limit`
    of them (the first `limit` under --order source)."""
    if order not in ORDERS:
        raise UserError(f"--order must be one of {', '.join(ORDERS)}, got {order}")
    indices = np.arange(count) if order == "source" else \
        np.random.default_rng(derive_seed(seed, PREPARE_ORDER)).permutation(count)
    return indices[:limit] if 0 < limit < count else indices


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# The source being written, set before the worker pool forks so that large in-memory
# arrays are shared with the workers instead of pickled into every job.
_SOURCE = None
# Where a shard writer reports samples seen, REPORT_EVERY at a time: the progress bar
# itself without workers, a counter in shared memory that the parent polls with them (a
# result comes back only when its whole shard, up to 10,000 samples, is written).
_REPORT = None
REPORT_EVERY = 64
POLL_S = 0.5  # the parent reads the workers' counter at least this often


def _loaded(indices: np.ndarray, skipped: list):
    """(source index, array, label) of the readable samples; the others noted in `skipped`."""
    pending = 0
    for i in indices.tolist():
        pending += 1
        if pending == REPORT_EVERY:
            _REPORT(pending)
            pending = 0
        try:
            array, label = _SOURCE.load(i)
        except SizeMismatch as err:  # stops the whole prepare: a mixed-size folder needs --resolution
            raise SizeMismatch(f"{_SOURCE.name_of(i)}: {err}") from None
        except samples_mod.BadSample as err:
            skipped.append({"file": _SOURCE.name_of(i), "reason": str(err)})
            continue
        yield i, array, label
    if pending:
        _REPORT(pending)


def _write_shard(job: tuple[Path, np.ndarray, str, int]) -> dict:
    import webdataset as wds

    path, indices, fmt, rows = job
    skipped, offsets, labels = [], [0], []
    loaded = _loaded(indices, skipped)
    with wds.TarWriter(str(path), mtime=0, encoder=False) as sink:
        if rows == 1:
            for i, array, label in loaded:
                sink.write(samples_mod.encode(f"{i:08d}", array, label, fmt))
                offsets.append(sink.tarstream.offset)  # where the next entry's first header starts
                labels.append(label)
        else:
            while chunk := list(itertools.islice(loaded, rows)):
                keys, arrays, chunk_labels = zip(*chunk, strict=True)
                sink.write(samples_mod.encode_chunk(f"{keys[0]:08d}", np.stack(arrays), np.array(chunk_labels),
                                                    np.array(keys)))
                offsets.append(sink.tarstream.offset)
                labels.extend(chunk_labels)
    class_counts = np.bincount(labels, minlength=len(_SOURCE.classes)).tolist() if _SOURCE.classes else []
    return {"name": path.name, "count": len(labels), "sha256": sha256_of(path), "skipped": skipped,
            "seen": len(indices), "offsets": offsets, "class_counts": class_counts}


def _run_jobs(jobs: list, workers: int, total: int) -> list[dict]:
    global _REPORT
    pool = seen = None
    if workers > 1:
        # fork shares _SOURCE and _REPORT with the workers; the pool is forked before rich starts
        # its refresh thread. Results come back in any order and are sorted by shard name.
        context = multiprocessing.get_context("fork")
        seen = context.Value("q", 0)  # samples the workers have read, all shards together
        _REPORT = functools.partial(_add_to, seen)
        pool = context.Pool(workers)
    try:
        with task_progress("prepare", total, "samples") as progress:
            if pool:
                results = _collect(pool.imap_unordered(_write_shard, jobs), len(jobs), seen, progress)
            else:
                _REPORT = progress.advance
                results = [_write_shard(job) for job in jobs]
    except SizeMismatch as err:
        raise UserError(f"images differ in size from the first one ({err}); pass --resolution N (or HxW) to resize "
                        "and centre-crop them all") from None
    finally:
        _REPORT = None
        if pool:
            pool.terminate()
    return sorted(results, key=lambda r: r["name"])


def _add_to(counter, n: int) -> None:
    with counter.get_lock():
        counter.value += n


def _collect(results, num_jobs: int, seen, progress) -> list[dict]:
    """The workers' shard results, advancing the progress from their shared counter between them."""
    collected, shown = [], 0
    while len(collected) < num_jobs:
        try:
            collected.append(results.next(timeout=POLL_S))
        except multiprocessing.TimeoutError:
            pass
        now = seen.value
        progress.advance(now - shown)
        shown = now
    return collected


def write_shards(source, out: str | Path, shard_size: int = 0, force: bool = False,
                 fmt: str = "npy", workers: int = 1, order: str = "shuffled", seed: int = 0,
                 limit: int = 0, chunk: int = 0) -> Path:
    """Write `source` as shards + index.json into `out`, atomically (shard_size 0: automatic),
    in a seeded random order (or the source's own), optionally only `limit` samples, in
    entries of `chunk` samples (0: automatic, 1: one per sample)."""
    global _SOURCE
    out = Path(out)
    if shard_size < 0:
        raise UserError(f"--shard-size must be > 0 (or 0 for automatic), got {shard_size}")
    if fmt not in samples_mod.FORMATS:
        raise UserError(f"--format must be one of {', '.join(samples_mod.FORMATS)}, got {fmt}")
    if fmt != "npy" and (source.dtype != "uint8" or len(source.shape) != 3 or source.shape[0] not in (1, 3)):
        raise UserError(f"--format {fmt} stores 1- or 3-channel uint8 images; this source has {source.dtype} "
                        f"samples of shape {list(source.shape)}: use --format npy")
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    rows = chunk_rows(chunk, fmt, source.shape, source.dtype)
    indices = sample_order(len(source), order, seed, limit)
    count = len(indices)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Left by a prepare that was killed (a concurrent prepare into the same --out is a mistake anyway).
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        jobs = [(tmp / f"shard-{n:06d}.tar", indices[start:stop], fmt, rows)
                for n, (start, stop) in enumerate(shard_bounds(count, shard_size))]
        _SOURCE = source
        results = _run_jobs(jobs, workers, count)
        index = _index(source, results, fmt, {"order": order, "seed": seed, "limit": limit, "chunk_size": rows})
        (tmp / "index.json").write_text(json.dumps(index, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _SOURCE = None
    _replace(tmp, out)
    return out


def _index(source, results: list[dict], fmt: str, selection: dict) -> dict:
    total = sum(r["count"] for r in results)
    if total == 0:
        raise UserError("no readable samples in the source; nothing written")
    # Offsets last in each shard's entry: index.json stays readable with them folded away.
    shard_keys = ("name", "count", "sha256", "class_counts", "offsets")
    return {"format": INDEX_FORMAT, "source": source.description, "count": total,
            "shape": list(source.shape), "dtype": source.dtype, "sample_format": fmt,
            "classes": source.classes, **selection,
            "skipped": [*getattr(source, "ignored", []), *(s for r in results for s in r["skipped"])],
            "shards": [{k: r[k] for k in shard_keys} for r in results if r["count"]]}


def _replace(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def verify(directory: str) -> list[str]:
    """Problems found re-checking every shard of a prepared directory against index.json."""
    index_file = Path(directory) / "index.json"
    if not index_file.is_file():
        raise UserError(f"--verify {directory}: no index.json there; is it a gan-dist prepare output?")
    try:
        index = json.loads(index_file.read_text())
        shards = [(shard["name"], shard["sha256"]) for shard in index["shards"]]
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"--verify {directory}: index.json is not a gan-dist prepare index ({err}); "
                        "re-run gan-dist prepare") from err
    problems = []
    for name, sha256 in shards:
        path = Path(directory) / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256_of(path) != sha256:
            problems.append(f"{name}: sha256 differs from index.json (corrupt or replaced)")
    return problems


def add_arguments(parser) -> None:
    parser.add_argument("source", nargs="?", default="",
                        help="digits | ring8 | grid25 | torchvision NAME | imagefolder PATH")
    parser.add_argument("name", nargs="?", default="",
                        help="torchvision: MNIST, FashionMNIST or CIFAR10; imagefolder: the folder")
    parser.add_argument("--out", default="", help="output directory (shards + index.json)")
    parser.add_argument("--verify", default="", metavar="DIR", help="re-check the sha256 of every shard in DIR")
    parser.add_argument("--root", default="", help="torchvision: directory holding (or receiving) its files")
    parser.add_argument("--split", default="train", choices=["train", "test"])
    parser.add_argument("--no-download", dest="download", action="store_false",
                        help="torchvision: never download, only read files under --root")
    parser.add_argument("--resolution", default="0", metavar="N|HxW",
                        help="resize and centre-crop to N x N, or to H x W pixels, height first (32x64: landscape)")
    parser.add_argument("--channels", type=int, default=None, help="imagefolder: 3 (RGB, default) or 1 (greyscale)")
    parser.add_argument("--format", default="npy", choices=samples_mod.FORMATS,
                        help="npy: raw uint8 (fastest to read); png: lossless, smaller; jpg: lossy, smallest")
    parser.add_argument("--limit", type=int, default=0,
                        help="keep only N samples, a seeded random choice (the first N with --order source; 0 = all)")
    parser.add_argument("--order", default="shuffled", choices=ORDERS,
                        help="shuffled: a seeded random order over the whole dataset (default; class-sorted folders "
                             "need it); source: the source's own order, for comparison")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order (recorded in index.json)")
    parser.add_argument("--shard-size", type=int, default=0,
                        help="samples per shard (default: at least 8 shards, at most 10,000 samples each)")
    parser.add_argument("--chunk", type=int, default=0,
                        help="npy: samples per tar entry (default: about 2 MiB of them, at most 1,024; 1 = one entry "
                             "per sample, the layout before chunks); png/jpg are always one per entry")
    parser.add_argument("--workers", type=int, default=1, help="processes encoding shards in parallel")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")


def run(args) -> int:
    if args.verify:
        problems = verify(args.verify)
        if problems:
            raise UserError(f"--verify {args.verify}: {len(problems)} bad shards: " + "; ".join(problems)
                            + "; re-run gan-dist prepare with --force")
        print(f"{args.verify}: every shard matches its sha256 in index.json")
        return 0
    if not args.source or not args.out:
        raise UserError("gan-dist prepare needs a source and --out DIR, e.g. gan-dist prepare digits --out data/digits")
    # Checked before loading the (possibly slow) source.
    if Path(args.out).exists() and not args.force:
        raise UserError(f"{args.out} already exists; pass --force to replace it")
    args.resolution = parse_resolution(str(args.resolution))
    for flag, value in (("--workers", args.workers - 1), ("--limit", args.limit),
                        ("--shard-size", args.shard_size), ("--chunk", args.chunk)):
        if value < 0:
            raise UserError(f"{flag} must be >= {1 if flag == '--workers' else 0}, got {getattr(args, flag[2:].replace('-', '_'))}")
    if args.channels is not None and args.source != "imagefolder":
        raise UserError("--channels applies to imagefolder only (torchvision sets keep their own channels)")
    source = open_source(args.source, args.name, args.root, args.split, args.resolution, args.download,
                         args.channels or 3)
    out = write_shards(source, args.out, args.shard_size, args.force, args.format, args.workers,
                       args.order, args.seed, args.limit, args.chunk)
    index = json.loads((out / "index.json").read_text())
    layout = f"chunks of {index['chunk_size']}" if index["chunk_size"] > 1 else "one entry per sample"
    print(f"wrote {index['count']} samples of shape {index['shape']} ({args.format}, {layout}, {args.order} order, "
          f"seed {args.seed}) in {len(index['shards'])} shards to {out}")
    from gan_dist.models.layers import grows_from_4px

    # Only where a size was asked for or a folder read: the built-in 8x8 digits are for the MLP.
    asked = args.resolution or args.source == "imagefolder"
    if asked and len(index["shape"]) == 3 and not grows_from_4px(tuple(index["shape"])):
        print(f"note: the conv models need a shorter side of 16, 32 or 64 px (dcgan) or up to 256 (r3gan) and a "
              f"longer side 1, 2 or 4 times it; {index['shape'][1]}x{index['shape'][2]} suits model.name=mlp only "
              f"(prepare again with e.g. --resolution 32 or 32x64)")
    for item in index["skipped"][:20]:
        print(f"  skipped {item['file']}: {item['reason']}")
    if len(index["skipped"]) > 20:
        print(f"  ... and {len(index['skipped']) - 20} more (all listed in {out}/index.json)")
    return 0
