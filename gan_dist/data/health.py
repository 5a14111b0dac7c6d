"""Bad samples during training: counted and reported, or a stop that every rank makes together.

The stream never turns a bad sample into a tensor (stream.py); it hands the trainer a count
and an example with the next batch. Here those become `Data/bad_samples` (summed over ranks)
and `Data/bad_fraction` per log interval, a loud warning above 1%, or, under
data.on_error=raise, a stop with the shard and key.
"""

from __future__ import annotations

import torch

from gan_dist.data.stream import Batch
from gan_dist.errors import UserError

WARN_FRACTION = 0.01


class DataHealth:
    def __init__(self, on_error: str, accelerator, console):
        self.on_error, self.acc, self.console = on_error, accelerator, console
        self.num_bad_samples = self.num_good_samples = 0  # this rank, since the last log line
        self.example = ""

    def account(self, batch: Batch) -> None:
        """Count skipped samples, or stop: on every rank at once under data.on_error=raise."""
        stop = ""
        if batch.fatal:
            stop = f"data: {batch.fatal}; check the shards (gan-dist prepare --verify DIR)"
        elif batch.bad_count and self.on_error == "raise":
            stop = (f"bad sample in the data: {batch.bad_messages[0]}; re-prepare or remove it, "
                    "or set data.on_error=skip to skip such samples")
        if self.on_error == "raise" and self.acc.num_processes > 1:
            # One tiny all-reduce per step, only in this mode: a rank that stops alone would
            # leave the others waiting in DDP's next all-reduce until the timeout.
            flag = torch.tensor([1.0 if stop else 0.0], device=self.acc.device)
            if bool(self.acc.reduce(flag, reduction="sum") > 0):
                raise UserError(stop or "another rank met a bad sample and stopped the run (its message is above)")
        elif stop:
            raise UserError(stop)
        self.num_good_samples += len(batch.keys)
        if batch.bad_count:
            self.num_bad_samples += batch.bad_count
            self.example = self.example or batch.bad_messages[0]

    def report(self, stats) -> None:
        """Before the interval's reduce: this rank's counts join the statistics."""
        seen = self.num_bad_samples + self.num_good_samples
        device = self.acc.device
        stats.report("Data/bad_samples", torch.tensor(float(self.num_bad_samples), device=device))
        stats.report("Data/bad_fraction", torch.tensor(self.num_bad_samples / max(1, seen), device=device))
        self.num_bad_samples = self.num_good_samples = 0

    def after_reduce(self, values: dict) -> None:
        # Means over ranks of per-rank counts; the log wants the total.
        values["Data/bad_samples"] = round(values["Data/bad_samples"] * self.acc.num_processes)
        if values["Data/bad_fraction"] > WARN_FRACTION:
            self.console.warn(f"{values['Data/bad_fraction']:.1%} of the samples read since the last log line "
                              f"were unreadable and skipped ({values['Data/bad_samples']} in all), e.g. "
                              f"{self.example or 'on another rank'}; check the shards with "
                              "gan-dist prepare --verify DIR")
        self.example = ""
