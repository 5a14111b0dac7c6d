"""Evaluation: FID/KID/IS on the TF-Inception network (torch-fidelity), classifier-based
scores for labelled digit datasets, and PacGAN mode coverage for the 2-D mixtures.
`gan-dist eval` and periodic evaluation during training share gan_dist.eval.run."""

from gan_dist.errors import UserError

METRICS = ("fid", "kid", "is", "modes2d", "cls")


def check_metrics(metrics: list[str]) -> list[str]:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise UserError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METRICS)}")
    return metrics
