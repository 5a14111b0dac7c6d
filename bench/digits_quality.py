"""Are the digits recognisable? Classify 4,096 samples of a run's final G_ema.

A scikit-learn MLP classifier is fitted on the bundled 8x8 digits (all 1,797). A sample
counts as recognisable when the classifier's top probability is >= 0.9; mode coverage is
the share of samples per predicted class (uniform would be 10% each). The same figures for
held-out real digits (classifier fitted on the other 70%) are printed as the ceiling.
Diversity within classes (mean pairwise distance between samples of the same class,
relative to the real digits') guards against the collapse that per-class shares miss:
a G that draws one image per class scores near 0. For a G with a categorical code
(model.num_latent_categories) it also prints the code's purity: the share of samples whose
class is the most common class of their code.

    python bench/digits_quality.py --run runs/default [--num 4096] [--seed 0]

4,096 samples, not 256: a class's share in 256 samples varies by about 1.9 points from run to
run of the check alone, enough to move a balanced G across the 5% line.

Exit code 0 when >= 90% are confident and every class gets 5-15%, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_limits

from gan_dist.checkpoint import load_generator
from gan_dist.models.layers import latent_code

CONFIDENCE, MIN_SHARE, MAX_SHARE, MIN_DIVERSITY = 0.9, 0.05, 0.15, 0.5


def classifier(X: np.ndarray, y: np.ndarray) -> MLPClassifier:
    return MLPClassifier((256,), max_iter=1000, random_state=0).fit(X, y)


def figures(clf: MLPClassifier, X: np.ndarray) -> tuple[float, np.ndarray]:
    proba = clf.predict_proba(X)
    confident = float((proba.max(1) >= CONFIDENCE).mean())
    shares = np.bincount(proba.argmax(1), minlength=10) / len(X)
    return confident, shares


def within_class_distance(X: np.ndarray, labels: np.ndarray) -> float:
    """Mean pairwise Euclidean distance between samples of the same class, averaged over classes."""
    means = []
    for c in np.unique(labels):
        members = X[labels == c]
        if len(members) > 1:
            dist = np.sqrt(((members[:, None] - members[None]) ** 2).sum(-1))
            means.append(dist.sum() / (len(members) * (len(members) - 1)))
    return float(np.mean(means))


def generate(run: str, num: int, seed: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """`num` samples of the run's G_ema as the classifier's inputs, the requested labels
    (conditional G) and the categorical codes read off z (model.num_latent_categories)."""
    G, info = load_generator(run)
    if len(info["shape"]) != 3 or info["shape"][0] != 1:
        sys.exit(f"{run} was trained on samples of shape {info['shape']}, not on the digits")
    z = torch.randn(num, info["model"]["latent_dim"], generator=torch.Generator().manual_seed(seed))
    # A conditional G is asked for every class equally often.
    labels = torch.arange(num) % info["num_classes"] if info["model"]["conditional"] else None
    with torch.no_grad():
        # Digits prepared at a higher resolution are brought back to 8x8 by area averaging.
        samples = torch.nn.functional.interpolate(G(z, labels), size=(8, 8), mode="area").reshape(num, 64)
    # The same quantisation as the stored data: [-1, 1] -> 0..255 -> the digits' 0..16 scale / 16.
    pixels = ((samples + 1) * 127.5).round().clamp(0, 255) / 255.0
    categories = info["model"].get("num_latent_categories", 0)
    codes = latent_code(z, categories).numpy() if categories else None
    return pixels.numpy(), None if labels is None else labels.numpy(), codes


def code_purity(codes: np.ndarray, predicted: np.ndarray) -> float:
    """Share of samples whose class is the most common class of their code (1 = each code draws one digit)."""
    table = np.zeros((codes.max() + 1, 10))
    np.add.at(table, (codes, predicted), 1)
    return float(table.max(1).sum() / len(codes))


def main() -> int:
    # One thread: scikit-learn's BLAS threads spin while a core is busy, and the fit then took
    # 261 s instead of 12 s beside another process on 2 cores.
    threadpool_limits(1)
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/default")
    parser.add_argument("--num", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the figures to PATH")
    args = parser.parse_args()
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    X_fit, X_held, y_fit, _ = train_test_split(X, y, test_size=0.3, random_state=0)
    real_conf, real_shares = figures(classifier(X_fit, y_fit), X_held)
    clf = classifier(X, y)
    samples, requested, codes = generate(args.run, args.num, args.seed)
    gan_conf, gan_shares = figures(clf, samples)
    diversity = within_class_distance(samples, clf.predict(samples)) / within_class_distance(X, y)
    print(f"| samples | confident (p >= {CONFIDENCE}) | smallest class | largest class |")
    print("|---|---|---|---|")
    print(f"| held-out real digits ({len(X_held)}) | {real_conf:.1%} | {real_shares.min():.1%} | {real_shares.max():.1%} |")
    print(f"| G_ema of {args.run} ({args.num}) | {gan_conf:.1%} | {gan_shares.min():.1%} | {gan_shares.max():.1%} |")
    print("class shares of the samples: " + " ".join(f"{c}:{s:.1%}" for c, s in enumerate(gan_shares)))
    print(f"diversity within classes: {diversity:.2f} of the real digits' (>= {MIN_DIVERSITY} expected)")
    proba = clf.predict_proba(samples)
    unsure = proba.max(1) < CONFIDENCE
    if unsure.any():  # blends of two digits put nearly all their probability on two classes
        top_two = np.sort(proba[unsure], axis=1)[:, -2:].sum(1).mean()
        print(f"unconfident samples: {unsure.mean():.1%}, with {top_two:.0%} of their probability on two classes")
    if codes is not None:
        print(f"categorical code: {code_purity(codes, clf.predict(samples)):.1%} of samples are their code's "
              "most common class (1 digit per code: 100%)")
    if requested is not None:
        # A conditional G sets the class shares itself; what matters is that it draws the class asked for.
        accuracy = float((clf.predict(samples) == requested).mean())
        print(f"conditional G: {accuracy:.1%} of samples are classified as the class they were drawn for")
    ok = gan_conf >= 0.9 and gan_shares.min() >= MIN_SHARE and gan_shares.max() <= MAX_SHARE
    print("recognisable digits: " + ("yes" if ok else "NO") + f" (needs >= 90% confident, every class "
          f"{MIN_SHARE:.0%}-{MAX_SHARE:.0%})")
    if args.json:  # for bench/quickstart.py, whose results file the README quotes
        figures_of_run = {"num_samples": args.num, "confident": gan_conf, "smallest_class": float(gan_shares.min()),
                          "largest_class": float(gan_shares.max()), "diversity": diversity,
                          "code_purity": None if codes is None else code_purity(codes, clf.predict(samples)),
                          "held_out_confident": real_conf, "verdict": bool(ok and diversity >= MIN_DIVERSITY)}
        Path(args.json).write_text(json.dumps(figures_of_run, indent=1) + "\n")
    return 0 if ok and diversity >= MIN_DIVERSITY else 1


if __name__ == "__main__":
    sys.exit(main())
