"""Evaluation during training: every eval.every_kimg and at the end, G_ema is scored on
every rank together; rank 0 appends the numbers to metrics.jsonl (as Eval/* keys), and when
the first metric improves, the run saves a checkpoint there and points checkpoints/best at
it (kept whatever checkpoint.keep_last says). best.json beside it holds the metric and value,
so a resumed run keeps comparing against the best so far."""

from __future__ import annotations

import json
import math
from pathlib import Path

from gan_dist import chaos
from gan_dist.eval.run import Target, _broadcast_object, evaluate

LOWER_IS_BETTER = {"fid": True, "kid": True, "is": False, "modes2d": True, "cls": True}


def flat(results: dict[str, dict]) -> dict[str, float]:
    """metrics.jsonl keys: Eval/fid, Eval/is, Eval/modes2d_modes, Eval/cls_is, ..."""
    out = {}
    for metric, r in results.items():
        if metric == "modes2d":
            out.update({"Eval/modes2d_modes": r["modes"], "Eval/modes2d_hq": r["hq_fraction"],
                        "Eval/modes2d_reverse_kl": r["reverse_kl"]})
        elif metric == "cls":
            out.update({"Eval/cls_is": r["is"], "Eval/cls_fd": r["fd"], "Eval/cls_spread_ratio": r["spread_ratio"]})
        else:
            out[f"Eval/{metric}"] = r["value"]
    return out


def primary(metric: str, results: dict[str, dict]) -> float:
    """The number that picks the best checkpoint (modes2d: reverse KL; cls: the Fréchet distance)."""
    r = results[metric]
    return r["reverse_kl"] if metric == "modes2d" else r["fd"] if metric == "cls" else r["value"]


class PeriodicEval:
    def __init__(self, cfg, run_dir: Path):
        self.cfg = cfg.eval
        self.dataset_name = cfg.data.dataset if not cfg.data.path else ""
        self.conditional = cfg.model.conditional
        self.best_file = run_dir / "checkpoints" / "best.json"
        self.last_step = -1

    def due(self, images_before: int, images_now: int) -> bool:
        every = int(self.cfg.every_kimg * 1000)
        return bool(every) and images_now // every > images_before // every

    def run(self, trainer, snapshot: Path | None = None) -> None:
        """Every rank. With `snapshot` (the final one) no new checkpoint is needed for best."""
        if not self.cfg.every_kimg or trainer.progress.step == self.last_step:
            return  # the end can fall on an interval: one evaluation per step
        self.last_step = trainer.progress.step
        trainer.watchdog.arm(f"the evaluation after step {trainer.progress.step}")
        trainer.sync_buffers()
        chaos.point("eval")
        opts = self.cfg
        info = trainer.info
        target = Target(trainer.ema.module, trainer.cfg.model.latent_dim,  # G_ema stays in eval mode
                        info.num_classes if self.conditional else 0, info, self.dataset_name)
        # The training console's own rich Console: on a terminal the steps' bars nest under the
        # training bar (two live displays on one terminal overwrite each other).
        results = evaluate(target, opts, trainer.acc, console=getattr(trainer.console, "rich", None))
        trainer.console.log_eval({"step": trainer.progress.step, "kimg": trainer.num_images / 1000, **flat(results)})
        metric = next(iter(opts.metrics))
        value = primary(metric, results)
        improved = _broadcast_object(self._improves(metric, value) if trainer.acc.is_main_process else None,
                                     trainer.acc.process_index)
        if improved:
            path = snapshot or trainer.checkpoint()  # nothing saved yet at this step
            if trainer.acc.is_main_process:
                self._mark_best(path, metric, value, trainer.progress.step)

    def _improves(self, metric: str, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if not self.best_file.is_file():
            return True
        best = json.loads(self.best_file.read_text())
        if best.get("metric") != metric:
            return True
        return value < best["value"] if LOWER_IS_BETTER[metric] else value > best["value"]

    def _mark_best(self, path: Path, metric: str, value: float, step: int) -> None:
        tmp = self.best_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"checkpoint": path.name, "metric": metric, "value": value, "step": step}))
        tmp.replace(self.best_file)
