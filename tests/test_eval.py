"""FID/KID/IS arithmetic, the evaluation pipeline with an injected extractor, and
`gan-dist eval` on a real run (modes2d, cls, and its errors)."""

import json

import numpy as np
import pytest
import torch
from conftest import ROOT
from scipy import linalg
from tiny_extractor import TinyExtractor

from gan_dist.errors import UserError
from gan_dist.eval import scores


def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
    var_a, var_b = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    diagonal = float(np.sum((mu_a - mu_b) ** 2) + np.sum(var_a + var_b - 2 * np.sqrt(var_a * var_b)))
    got = scores.frechet_distance({"mu": mu_a, "sigma": np.diag(var_a)}, {"mu": mu_b, "sigma": np.diag(var_b)})
    assert got == pytest.approx(diagonal, rel=1e-9)
    # Full covariances: against the textbook formula with a matrix square root.
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    cov_a, cov_b = a @ a.T + np.eye(6), b @ b.T + np.eye(6)
    expected = float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real))
    assert scores.frechet_distance({"mu": mu_a, "sigma": cov_a}, {"mu": mu_b, "sigma": cov_b}) == pytest.approx(
        expected, rel=1e-7)
    # From samples: the statistics are estimated, so close, not equal.
    x = torch.from_numpy(rng.normal(size=(40_000, 6)) * np.sqrt(var_a) + mu_a)
    y = torch.from_numpy(rng.normal(size=(40_000, 6)) * np.sqrt(var_b) + mu_b)
    assert scores.frechet_distance(scores.statistics(x), scores.statistics(y)) == pytest.approx(diagonal, rel=0.05)


def test_kid_is_unbiased_on_identical_sets_and_positive_between_different_ones():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1500, 16, generator=gen)
    # 20 subsets of 500 instead of the shipped 100 of 1,000: torch-fidelity takes 0.2 s a subset.
    same, _ = scores.kernel_distance(x, x, subsets=20, subset_size=500)
    other, _ = scores.kernel_distance(x, torch.randn(1500, 16, generator=gen) + 0.5, subsets=20, subset_size=500)
    assert abs(same) < 0.01 * other
    assert other > 0.1


def test_inception_score_of_confident_uniform_and_of_collapsed_predictions():
    confident = torch.eye(10).repeat(5000, 1) * 50  # every class, each sure: IS = number of classes
    assert scores.inception_score(confident)[0] == pytest.approx(10, rel=1e-2)
    assert scores.inception_score(torch.zeros(1000, 10))[0] == pytest.approx(1.0)


def test_spread_tells_a_lost_class_from_fainter_features():
    """Two classes of features, 500 each; "blurred": every feature vector shrunk to 40% (a
    classifier's features fade with edge contrast); "one class": the first class only."""
    gen = torch.Generator().manual_seed(0)
    directions = torch.eye(2, 16) * 10
    real = torch.cat([d + torch.randn(500, 16, generator=gen) for d in directions]).relu()
    blurred, one_class = real * 0.4, real[:500]
    for unit in (False, True):
        ratio = {name: scores.mean_pairwise_distance(x, unit=unit) / scores.mean_pairwise_distance(real, unit=unit)
                 for name, x in (("blurred", blurred), ("one class", one_class))}
        if unit:
            assert ratio["blurred"] == pytest.approx(1, abs=1e-9) and ratio["one class"] < 0.4, ratio
        else:  # the raw distance reads both alike: why `cls` reports the unit one as spread_ratio
            assert ratio["blurred"] == pytest.approx(0.4) and ratio["one class"] < 0.4, ratio


def test_pipeline_with_an_injected_extractor_caches_its_reference(digits_dir, tmp_path):
    from accelerate import Accelerator

    from gan_dist.config import ModelConfig
    from gan_dist.data.stream import open_dataset
    from gan_dist.eval.run import EvalOptions, Target, evaluate
    from gan_dist.models import build_models

    data = open_dataset(str(digits_dir))
    torch.manual_seed(0)
    G, _ = build_models(ModelConfig(name="mlp", width_mult=0.125, latent_dim=16), data.shape, 0)
    target = Target(G.eval(), 16, 0, data, "digits")
    opts = EvalOptions(metrics=["fid", "kid", "is"], num=200, batch=64, cache_dir=str(tmp_path))
    first = evaluate(target, opts, Accelerator(cpu=True), {"inception": TinyExtractor()})
    cached = list(tmp_path.glob("*-tiny-test.pt"))
    assert len(cached) == 1, "the reference features were not cached"
    assert first == evaluate(target, opts, Accelerator(cpu=True), {"inception": TinyExtractor()})
    assert first["fid"]["value"] > 0 and first["kid"]["value"] > 0
    assert first["fid"]["reference"].startswith(f"{data.count} real samples")
    with pytest.raises(UserError, match="modes2d scores the 2-D mixtures"):
        evaluate(target, EvalOptions(metrics=["modes2d"]), Accelerator(cpu=True))


def test_missing_inception_weights_say_where_to_put_them(tmp_path):
    from gan_dist.eval.features import InceptionFeatures

    with pytest.raises(UserError, match="no such file. Download https://.*weights-inception-2015-12-05"):
        InceptionFeatures(str(tmp_path / "nope.pth"))


def test_gan_dist_eval_on_runs(train_main, tmp_path, capsys):
    """modes2d on a short ring8 run through the CLI, and the CLI's refusals."""
    from gan_dist.cli import main
    from gan_dist.data.prepare import write_shards
    from gan_dist.data.sources import mixture

    # 5,000 of the 100,000 points: writing all of them would take most of this test's time.
    ring8 = write_shards(mixture("ring8"), tmp_path / "ring8-5k", limit=5000)
    code, _, err = train_main("--config", str(ROOT / "configs" / "ring8.yaml"), f"data.path={ring8}",
                              "train.total_kimg=2", "data.num_workers=0", "log.sample_every_kimg=1")
    assert code == 0, err
    assert main(["eval", "--run", "runs/ring8", "--metrics", "modes2d", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["results"]["modes2d"]
    assert result["num_samples"] == 2500 and result["num_modes"] == 8 and 0 <= result["modes"] <= 8
    assert main(["eval", "--run", "runs/ring8", "--metrics", "fid"]) == 2
    assert "FID, KID and IS need images" in capsys.readouterr().err
    assert main(["eval", "--run", "runs/ring8", "--metrics", "fod"]) == 2
    assert "unknown metric(s) fod" in capsys.readouterr().err


def test_periodic_evaluation_logs_and_keeps_the_best_checkpoint(train_main, digits_dir, tmp_path, monkeypatch):
    from conftest import tiny_args

    from gan_dist.eval import classifier

    # What is tested is the schedule and the best checkpoint, not the classifier's accuracy:
    # a briefly trained one (into this test's own cache) saves a minute.
    monkeypatch.setattr(classifier, "EPOCHS", 1)
    monkeypatch.setattr(classifier, "MIN_STEPS", 20)

    code, out, err = train_main(*tiny_args(digits_dir, "train.total_kimg=1.2", "eval.every_kimg=0.4",
                                           "eval.metrics=[cls]", "eval.num=200", f"eval.cache_dir={tmp_path / 'c'}",
                                           "checkpoint.every_kimg=0.2", "checkpoint.keep_last=1"))
    assert code == 0, err
    run_dir = tmp_path / "runs" / "tiny"
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "Eval/cls_fd" in r]
    assert [round(r["kimg"], 1) for r in evals] == [0.4, 0.8, 1.2]
    assert "eval after step" in out
    best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    assert best["metric"] == "cls"
    assert best["value"] == min(r["Eval/cls_fd"] for r in evals)
    assert (run_dir / "checkpoints" / best["checkpoint"] / "G_ema.safetensors").is_file(), "best was pruned"
