"""N processes compute what one process computes with N times the batch: proven with 2 gloo
ranks on CPU, plus the guards that keep ranks together (non-finite skips, consistency
checks, bad data). Two launches run every case (tests/helpers/harness.py): one plain
process and one `torchrun --nproc_per_node 2`.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import HELPERS, ROOT
from test_launch import LAUNCHERS, _free_port

from gan_dist.data.prepare import write_shards
from gan_dist.data.sources import digits

pytestmark = pytest.mark.launch

EQ_CASES = ["eq-mlp-r1", "eq-mlp-r1-resident", "eq-mlp-hinge", "eq-mlp-relativistic", "eq-mlp-ada", "eq-mlp-gp", "eq-mlp-diffaug", "eq-mlp-code", "eq-dcgan-r1",
            "eq-dcgan-hinge", "eq-dcgan-reuse"]
MICRO_CASES = {"eq-mlp-r1-micro2": "eq-mlp-r1", "eq-dcgan-hinge-micro2": "eq-dcgan-hinge"}
TWO_RANK_ONLY = ["http-flaky", "http-lost", "bn_d-r1-ncritic-micro", "spectral-gp-conditional", "nan-on-rank1", "perturb-rank1",
                 "bad-data-raise", "fatal-data-raise", "resume-full", "resume-leg1", "resume-leg2", "stale-leg1", "stale-leg2",
                 "eager-r1r2", "compile-r1r2"]


def _corrupt_copy(out):
    """The digits with one undecodable sample in shard 3."""
    from shards import rewrite_shard

    path = write_shards(digits(), out / "bad-digits", chunk=1)
    rewrite_shard(path, 3, [{"__key__": "broken01", "npy": b"not an array", "cls": b"1"}])


@pytest.fixture(scope="module")
def harness(digits_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("harness")
    digits16 = write_shards(digits(16), out / "digits16")
    _corrupt_copy(out)
    from flaky_http import serve

    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK"))}
    env.update(PYTHONPATH=f"{HELPERS}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1")
    flaky, env["GAN_DIST_TEST_FLAKY_URL"] = serve(digits_dir, {"shard-000002.tar": 5})
    lost, env["GAN_DIST_TEST_LOST_URL"] = serve(digits_dir, {"shard-000002.tar": -1})
    args = [str(HELPERS / "harness.py"), str(digits_dir), str(digits16), str(out)]
    try:
        for prefix, cases in (([sys.executable], [*EQ_CASES, *MICRO_CASES, "eval"]),
                              (LAUNCHERS["torchrun"](_free_port()), [*EQ_CASES, *TWO_RANK_ONLY, "eval"])):
            result = subprocess.run([*prefix, *args, *cases], env=env, cwd=out, capture_output=True, text=True,
                                    timeout=400, check=False)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    finally:
        flaky.shutdown()
        lost.shutdown()

    def load(case: str, world: int, rank: int = 0) -> dict:
        return torch.load(out / case / f"w{world}-rank{rank}.pt")

    load.out, load.flaky_requests = out, flaky.requests
    return load


def _max_diff(a: dict, b: dict) -> float:
    return max((a[net][k] - b[net][k]).abs().max().item() for net in ("G", "D") for k in a[net])


@pytest.mark.parametrize("case", EQ_CASES)
def test_two_processes_equal_one_process_with_twice_the_batch(harness, case):
    one, ranks = harness(case, 1), [harness(case, 2, r) for r in (0, 1)]
    assert one["outcome"] == ranks[0]["outcome"] == ranks[1]["outcome"] == "ok"
    assert one["G"][next(iter(one["G"]))].dtype == torch.float64
    moved = max((one["G"][k] - one["G0"][k]).abs().max().item() for k in one["G"])
    assert moved > 1e-3, "training did not move G: the comparison would prove nothing"
    for rank in ranks:
        assert _max_diff(rank, one) < 1e-5


def test_ada_moves_p_alike_on_every_rank_and_augments_both_phases(harness):
    """eq-mlp-ada: the same p after each adjustment for 1 process and both of 2 ranks, in
    (0.2, 0.8) after the second, each a step of 0.1; and images changed in the D and G phases."""
    one, ranks = harness("eq-mlp-ada", 1), [harness("eq-mlp-ada", 2, r) for r in (0, 1)]
    assert one["ada_p"] == ranks[0]["ada_p"] == ranks[1]["ada_p"] and len(one["ada_p"]) == 2, one["ada_p"]
    steps = [b - a for a, b in zip([0.5, *one["ada_p"]], one["ada_p"])]
    assert all(abs(abs(step) - 0.1) < 1e-6 for step in steps) and 0.2 < one["ada_p"][1] < 0.8, one["ada_p"]
    for run in (one, *ranks):
        assert run["augmented"]["D"] > 0 and run["augmented"]["G"] > 0, run["augmented"]


@pytest.mark.parametrize("micro, single", sorted(MICRO_CASES.items()))
def test_two_micro_batches_equal_one_batch_of_twice_the_size(harness, micro, single):
    accumulated, whole = harness(micro, 1), harness(single, 1)
    assert accumulated["outcome"] == "ok" and accumulated["step"] == whole["step"] == 5
    assert _max_diff(accumulated, whole) < 1e-5


@pytest.mark.parametrize("case", ["bn_d-r1-ncritic-micro", "spectral-gp-conditional"])
def test_norm_layers_and_regularisers_keep_ranks_identical(harness, case):
    ranks = [harness(case, 2, r) for r in (0, 1)]
    assert [r["outcome"] for r in ranks] == ["ok", "ok"]
    for net in ("G", "D", "G_ema"):
        for name, tensor in ranks[0][net].items():
            assert torch.equal(tensor, ranks[1][net][name]), f"{net}.{name} differs between ranks"
    assert any(name.endswith("running_mean") or "parametrizations" in name for name in ranks[0]["D"])
    # ...with DDP's per-forward buffer broadcast off: sync_buffers() alone makes them agree.
    assert ranks[0]["broadcast_buffers"] == [False, False]


def test_a_nan_on_one_rank_makes_every_rank_skip(harness):
    ranks = [harness("nan-on-rank1", 2, r) for r in (0, 1)]
    assert [r["outcome"] for r in ranks] == ["ok", "ok"]
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == {"G": 0, "D": 1}
    assert _max_diff(ranks[0], ranks[1]) == 0
    assert all(torch.isfinite(t).all() for r in ranks for t in r["G"].values())


def test_a_perturbed_rank_is_detected_by_name(harness):
    for rank in (0, 1):
        outcome = harness("perturb-rank1", 2, rank)["outcome"]
        assert outcome.startswith("RankMismatchError: G.") and "rank(s) [1]" in outcome


def test_bad_data_under_raise_stops_every_rank_together(harness):
    outcomes = [harness("bad-data-raise", 2, r)["outcome"] for r in (0, 1)]
    assert all(o.startswith("UserError") for o in outcomes)
    assert any("shard-000003.tar key broken01" in o for o in outcomes)
    assert harness("bad-data-raise", 2, 0)["step"] == harness("bad-data-raise", 2, 1)["step"]


def test_a_rank_whose_stream_gives_up_stops_every_rank_together(harness):
    """Under raise, a rank that cannot read any shard (its node lost the storage) has no batch
    at all; it trains on a stand-in until the ranks' vote, read two D steps later, stops them
    all at the same step."""
    ranks = [harness("fatal-data-raise", 2, r) for r in (0, 1)]
    assert all(r["outcome"].startswith("UserError") for r in ranks), [r["outcome"] for r in ranks]
    assert all("rank 1: data: shard unreadable" in r["outcome"] and "connection reset" in r["outcome"] for r in ranks)
    assert ranks[0]["step"] == ranks[1]["step"]


def test_a_shard_cut_off_five_times_is_retried_and_trained_on_once(harness, digits_dir):
    """Over http, shard 2's first 5 requests break off half-way: the run goes on, each slot's
    first epoch holds exactly its planned samples (shard 2's among them, each once), and the
    failures and retries are in metrics.jsonl."""
    from shards import keys_in

    from gan_dist.data.plan import plan_epoch
    from gan_dist.data.stream import open_dataset

    ranks = [harness("http-flaky", 2, r) for r in (0, 1)]
    assert [r["outcome"] for r in ranks] == ["ok", "ok"]
    info = open_dataset(str(digits_dir))
    keys_of = [keys_in(url) for url in info.urls]
    plan = plan_epoch(info.shard_counts, 0, 0, 4)
    epoch0 = []
    for rank, state in enumerate(ranks):
        for worker in (0, 1):
            want = [k for p in plan[rank * 2 + worker] for k in keys_of[p.shard][p.start:p.stop]]
            got = [k for w, keys in state["consumed"] if w == worker for k in keys][:len(want)]
            assert sorted(got) == sorted(want), (rank, worker)
            epoch0 += got
    assert sorted(epoch0) == sorted(k for keys in keys_of for k in keys)
    records = [json.loads(line) for line in (harness.out / "runs" / "http-flaky-w2" / "metrics.jsonl")
               .read_text().splitlines()]
    assert harness.flaky_requests["shard-000002.tar"] > 5  # every fault was met, then it was served
    assert sum(r["Data/shard_failures"] for r in records) == 5
    assert sum(r["Data/shard_retries"] for r in records) == 5


def test_a_shard_that_never_returns_stops_both_ranks_together(harness):
    ranks = [harness("http-lost", 2, r) for r in (0, 1)]
    assert all(r["outcome"].startswith("UserError") and "shard-000002.tar" in r["outcome"] and "3 times" in r["outcome"]
               for r in ranks), [r["outcome"] for r in ranks]
    assert ranks[0]["step"] == ranks[1]["step"] < 200


def test_two_processes_with_two_workers_resume_exactly(harness):
    from test_resume import _assert_bitwise_equal, _final

    for case in ("resume-full", "resume-leg1", "resume-leg2"):
        assert [harness(case, 2, r)["outcome"] for r in (0, 1)] == ["ok", "ok"], case
    full = _final(harness.out / "runs" / "resume-full", 40)
    split = _final(harness.out / "runs" / "resume-split", 40)
    _assert_bitwise_equal(full[0], split[0], "weights")
    _assert_bitwise_equal(full[1], split[1], "optimizers")
    assert full[2]["progress"] == split[2]["progress"] and split[2]["world_size"] == 2
    positions = [json.loads((harness.out / "runs" / "resume-split" / "checkpoints" / "step_00000021" /
                             f"rank{r}.json").read_text())["stream"] for r in (0, 1)]
    assert all(len(p["workers"]) == 2 for p in positions)


def test_two_process_evaluation_equals_one_process(harness):
    """Generation, feature extraction and the classifier's training split by rank, gathered."""
    one, ranks = harness("eval", 1), [harness("eval", 2, r) for r in (0, 1)]
    assert ranks[0] == ranks[1], "ranks returned different results"
    for result in (one, *ranks):
        assert result.pop("again") == result, "a second evaluation, from the cached reference, differs"
    assert set(one) == {"fid", "kid", "is", "cls"}
    for metric in ("fid", "kid", "is"):
        assert one[metric]["num_generated"] == ranks[0][metric]["num_generated"] == 301
        assert ranks[0][metric]["value"] == pytest.approx(one[metric]["value"], rel=1e-5, abs=1e-9), metric
    assert one["fid"]["value"] > 0
    for key in ("is", "fd"):
        assert ranks[0]["cls"][key] == pytest.approx(one["cls"][key], rel=1e-5), key
        assert ranks[0]["cls"]["real_heldout"][key] == pytest.approx(one["cls"]["real_heldout"][key], rel=1e-5)
    assert ranks[0]["cls"]["class_fractions"] == one["cls"]["class_fractions"]


def test_a_rank_with_a_stale_view_of_latest_resumes_where_rank_0_does(harness):
    """Rank 1 reads `latest` as step 10 while it names step 21: it still resumes from 21,
    because rank 0 alone reads the run directory, and the run ends as the unbroken one does."""
    from test_resume import _assert_bitwise_equal, _final

    for case in ("stale-leg1", "stale-leg2"):
        assert [harness(case, 2, r)["outcome"] for r in (0, 1)] == ["ok", "ok"], case
    assert [harness("stale-leg2", 2, r)["step"] for r in (0, 1)] == [40, 40]
    assert sorted(p.name for p in (harness.out / "runs" / "stale" / "checkpoints").glob("step_*")) == \
        ["step_00000021", "step_00000030", "step_00000040"]  # keep_last 3: 10 and 20 were pruned
    stale, full = _final(harness.out / "runs" / "stale", 40), _final(harness.out / "runs" / "resume-full", 40)
    _assert_bitwise_equal(full[0], stale[0], "weights")
    _assert_bitwise_equal(full[1], stale[1], "optimizers")


def test_compiled_g_and_d_under_ddp_match_eager(harness):
    eager, compiled = harness("eager-r1r2", 2), harness("compile-r1r2", 2)
    assert eager["outcome"] == compiled["outcome"] == "ok" and eager["step"] == compiled["step"] == 6
    assert eager["graphs"] == 0 < compiled["graphs"], "torch.compile did not compile anything"
    moved = max((eager["G"][k] - eager["G0"][k]).abs().max().item() for k in eager["G"])
    assert moved > 1e-3, "training did not move G: the comparison would prove nothing"
    assert compiled["G"][next(iter(compiled["G"]))].dtype == torch.float64  # float32 rounding is not the question
    assert _max_diff(eager, compiled) < 1e-9
    assert _max_diff(compiled, harness("compile-r1r2", 2, 1)) == 0  # both ranks hold the same networks
