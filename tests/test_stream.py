"""The shard stream: splits by rank and worker, remote URLs, and bad data under skip/raise."""

import io
import itertools
import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import tiny_args
from shards import keys_in

from gan_dist.data.prepare import write_shards
from gan_dist.data.sources import ArraySource, digits
from gan_dist.data.stream import make_loader, open_dataset
from gan_dist.errors import UserError


def _finite_keys(info, rank, world_size, num_workers, seed=0, batch=16):
    loader = make_loader(info, batch, seed, rank, num_workers, shuffle_buffer=50, world_size=world_size, num_epochs=1)
    batches = [b for b in loader if len(b.keys)]
    return [int(k) for b in batches for k in b.keys], len(batches)


@pytest.mark.parametrize("num_workers, shard_size", [(2, 100), (2, 1000), (0, 256)])
def test_ranks_and_workers_read_disjoint_samples_in_equal_batches(tmp_path, num_workers, shard_size):
    """18 shards (more than slots) split whole; 2 shards (fewer than 4 slots) split by sample."""
    path = write_shards(digits(), tmp_path / "d", shard_size=shard_size)
    info = open_dataset(str(path))
    (keys0, batches0), (keys1, batches1) = (_finite_keys(info, r, 2, num_workers) for r in (0, 1))
    assert batches0 == batches1 > 0
    assert not set(keys0) & set(keys1)
    assert len(set(keys0)) == len(keys0) and len(set(keys1)) == len(keys1)
    # Dropped: partial batches, and what the rank with more shards has beyond the other's count.
    assert len(keys0) == len(keys1) == batches0 * 16 and len(keys0) + len(keys1) > 0.8 * info.count


def test_each_epoch_deals_the_shards_anew(digits_dir):
    from gan_dist.data.plan import slot_pieces

    info = open_dataset(str(digits_dir))  # 8 shards
    dealt = [slot_pieces(info.shard_counts, 0, epoch, 0, 2) for epoch in range(4)]
    assert len({tuple(d) for d in dealt}) > 1
    shard_of = {key: n for n, url in enumerate(info.urls) for key in keys_in(url)}
    keys = [int(k) for b in make_loader(info, 16, 0, 0, 0, 1, world_size=2, num_epochs=1) for k in b.keys]
    read = {(shard_of[k], i) for k in keys for i in [keys_in(info.urls[shard_of[k]]).index(k)]}
    assert all(any(p.shard == s and p.start <= i < p.stop for p in dealt[0]) for s, i in read)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def http_root(digits_dir):
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(digits_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait()


def _endless_keys(info, num_batches=20):
    return [k for b in itertools.islice(iter(make_loader(info, 16, 0, 0, 0, 50)), num_batches) for k in b.keys]


def test_http_and_pipe_give_the_local_stream(digits_dir, http_root):
    local = open_dataset(str(digits_dir))
    over_http = open_dataset(f"{http_root}/")
    assert over_http.urls[0] == f"{http_root}/shard-000000.tar"  # read with Range requests, not curl
    assert over_http.count == 1797 and over_http.shard_counts == local.shard_counts
    assert _finite_keys(over_http, 0, 1, 0) == _finite_keys(local, 0, 1, 0)
    piped_index = open_dataset(f"pipe:cat {digits_dir}/index.json")
    assert piped_index.urls[1] == f"pipe:cat {digits_dir}/shard-000001.tar"
    assert _finite_keys(piped_index, 0, 1, 0) == _finite_keys(local, 0, 1, 0)
    # Patterns carry no index: the endless stream is compared instead.
    local_pattern = open_dataset(str(digits_dir / "shard-{000000..000007}.tar"))
    http_pattern = open_dataset(f"{http_root}/shard-{{000000..000007}}.tar")
    pipe_pattern = open_dataset(f"pipe:cat {digits_dir}/shard-{{000000..000007}}.tar")
    assert _endless_keys(http_pattern) == _endless_keys(pipe_pattern) == _endless_keys(local_pattern)


def test_remote_mistakes_name_the_fix(tmp_path):
    with pytest.raises(UserError, match="use data.path='pipe:aws s3 cp URL -'"):
        open_dataset("s3://bucket/shard-000000.tar")
    with pytest.raises(UserError, match="no readable sample in the first shard .*unreadable"):
        open_dataset(f"pipe:cat {tmp_path}/missing-{{000000..000001}}.tar")


def test_a_shard_that_fails_is_deferred_and_read_once_in_its_epoch(digits_dir, tmp_path):
    """A failing command is one failure event (not a hang, not bad samples): the shard is
    retried later in the same epoch, and every sample of the epoch comes exactly once."""
    flaky, marker = tmp_path / "flaky.sh", tmp_path / "failed-once"
    flaky.write_text(f"if [ -e {marker} ]; then cat \"$1\"; else touch {marker}; exit 1; fi\n")
    info = open_dataset(str(digits_dir))
    info.urls[0] = f"pipe:sh {flaky} {info.urls[0]}"
    loader = make_loader(info, 1, 0, 0, 0, 1, num_epochs=1, retry_backoff_s=0)
    batches = list(loader)
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == info.count
    assert sum(b.shard_failures for b in batches) == 1 and sum(b.shard_retries for b in batches) == 1
    assert sum(b.bad_count for b in batches) == 0
    assert len(batches[-1].failures) == 1 and batches[-1].failures[0][1] == 0  # (queue step, delivered)


def test_a_shard_that_never_comes_back_ends_the_stream_by_name(digits_dir):
    info = open_dataset(str(digits_dir))
    info.urls[2] = f"pipe:exit 1; cat {info.urls[2]}"
    batches = list(make_loader(info, 16, 0, 0, 0, 1, max_shard_retries=2, retry_backoff_s=0, num_epochs=1))
    assert batches[-1].fatal and "shard-000002.tar" in batches[-1].fatal and "3 times" in batches[-1].fatal
    assert sum(b.shard_failures for b in batches) == 3 and sum(b.shard_retries for b in batches) == 2


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


BAD_CASES = {
    "corrupt image": lambda key: {"__key__": key, "npy": b"\x93NUMPY garbage", "cls": b"3"},
    "wrong shape": lambda key: {"__key__": key, "npy": _npy(np.zeros((1, 9, 8), np.uint8)), "cls": b"3"},
    "missing label": lambda key: {"__key__": key, "npy": _npy(np.zeros((1, 8, 8), np.uint8))},
}
BAD_MESSAGES = {"corrupt image": "corrupt .npy", "wrong shape": "shape [1, 9, 8] instead of the dataset's [1, 8, 8]",
                "missing label": "no label (.cls) in a class-conditional run"}


def _bad_dataset(tmp_path, case: str):
    """The digits in 8 shards, one entry per sample, with one bad sample (or a truncated
    shard) in shard 3 (test_chunks.py has the chunked cases)."""
    from shards import rewrite_shard

    path = write_shards(digits(), tmp_path / case.replace(" ", "_"), chunk=1)
    shard = path / "shard-000003.tar"
    if case == "truncated tar":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
        return path
    rewrite_shard(path, 3, [BAD_CASES[case]("bad00001")])
    return path


@pytest.mark.parametrize("case", list(BAD_MESSAGES))
def test_bad_data_is_skipped_and_counted_or_raised_with_its_name(train_main, tmp_path, case):
    path = _bad_dataset(tmp_path, case)
    args = [*tiny_args(path, "model.conditional=true", "train.total_kimg=3", "log.every_steps=1000")]
    code, _, err = train_main(*args, "run.name=skip")
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "runs" / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["Data/bad_samples"] for r in records) >= 1
    code, _, err = train_main(*args, "run.name=raise", "data.on_error=raise")
    assert code == 2
    assert "shard-000003.tar" in err and BAD_MESSAGES[case] in err and "data.on_error=skip" in err
    assert "Traceback" not in err


def test_a_truncated_shard_is_retried_then_stops_the_run_naming_it(train_main, tmp_path):
    path = _bad_dataset(tmp_path, "truncated tar")
    code, _, err = train_main(*tiny_args(path, "train.total_kimg=3", "data.retry_backoff_s=0", "data.max_shard_retries=2"))
    assert code == 2 and "shard-000003.tar" in err and "truncated" in err and "3 times" in err
    assert "Traceback" not in err


def test_unconditional_runs_ignore_missing_labels(train_main, tmp_path):
    path = _bad_dataset(tmp_path, "missing label")
    code, _, err = train_main(*tiny_args(path, "data.on_error=raise", "train.total_kimg=3"))
    assert code == 0, err


def test_many_bad_samples_warn_loudly(train_main, tmp_path):
    images = digits()
    from shards import rewrite_shard

    path = write_shards(ArraySource(images.samples, images.labels, images.classes, "half broken"), tmp_path / "d",
                        chunk=1)
    for shard in (1, 5):
        rewrite_shard(path, shard, [BAD_CASES["corrupt image"](f"bad{shard}{i:04d}") for i in range(200)])
    code, out, err = train_main(*tiny_args(path, "train.total_kimg=2"))
    assert code == 0, err
    assert "WARNING" in out and "were unreadable and skipped" in out


def test_nothing_but_bad_samples_stops_instead_of_hanging(tmp_path):
    from gan_dist.data import stream

    path = _bad_dataset(tmp_path, "corrupt image")
    info = open_dataset(str(path))
    info.urls, info.shard_counts = [info.urls[3]], [1]
    batch = next(iter(make_loader(info, 8, 0, 0, 0, 1)))
    assert batch.fatal and f"{stream.MAX_BAD_IN_A_ROW} bad samples in a row" in batch.fatal


def test_a_failure_while_a_resume_skips_forward_does_not_shift_the_stream(digits_dir, monkeypatch):
    """The storage fails again while a resumed epoch re-reads what it skips: that read is
    retried in place, so the records after the skip are the uninterrupted stream's."""
    from gan_dist.data import stream
    from gan_dist.data.stream import ShardStream, StreamSpec, _Event

    info = open_dataset(str(digits_dir))
    failing = set()
    read_piece = stream.read_piece

    def flaky(url, piece, *args, **kwargs):
        delivered = 0
        for record in read_piece(url, piece, *args, **kwargs):
            if (piece.shard, piece.start) in failing and delivered >= 5:
                failing.discard((piece.shard, piece.start))
                raise stream.ReadFailure(f"{url}: connection reset")
            delivered += len(record)
            yield record

    monkeypatch.setattr(stream, "read_piece", flaky)

    def records(skip: int, count: int = 200):
        spec = StreamSpec(info.urls, info.shape, info.dtype, 0, 16, 0, 0, 2, 50, info.chunk_size, 0,
                          info.shard_counts, info.offsets, None, 8, 0.0)
        reader = ShardStream(spec)
        reader.log = None
        units = (["event"] if isinstance(r, _Event) else r.keys.tolist() for _, _, r in reader._numbered(0, 0, 0, 2, skip, []))
        return list(itertools.islice(itertools.chain.from_iterable(units), count))

    uninterrupted = records(0, 300)
    first_piece = stream.slot_pieces(info.shard_counts, 0, 0, 0, 2)[0]
    failing.add((first_piece.shard, first_piece.start))  # fails inside what the resume skips
    assert records(100) == uninterrupted[100:300] and not failing


def test_a_script_that_exits_with_its_loader_alive_does_not_hang(digits_dir):
    """Workers ignore SIGTERM (a SLURM stop must reach the main process first), and Python's
    exit terminates daemonic children with SIGTERM before joining them: a script holding a
    live worker iterator in a global used to hang at exit for ever."""
    script = ("import sys\nfrom gan_dist.data.stream import make_loader, open_dataset\n"
              f"loader = iter(make_loader(open_dataset({str(digits_dir)!r}), 16, 0, 0, 1, 50))\n"
              "next(loader)\nprint('took a batch', flush=True)\n")
    try:
        result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True,
                                timeout=60)
    except subprocess.TimeoutExpired as hang:
        pytest.fail(f"the script did not exit: {hang.stdout!r}")
    assert result.returncode == 0 and "took a batch" in result.stdout, result.stderr[-2000:]
