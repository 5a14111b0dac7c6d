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
VOTE_LAG = 2  # D steps: the host may run that far ahead of the device before a vote is read


class DataHealth:
    def __init__(self, on_error: str, accelerator, console):
        self.on_error, self.acc, self.console = on_error, accelerator, console
        self.num_bad_samples = self.num_good_samples = 0  # this rank, since the last log line
        self.example = ""
        # Under data.on_error=raise with several ranks, "did any rank stop" is voted on every D
        # step and learned VOTE_LAG D steps later, with no per-step host read (parallel.RankVote).
        self.vote = None
        if on_error == "raise" and accelerator.num_processes > 1:
            from gan_dist.parallel import RankVote

            self.vote = RankVote(accelerator, lag=VOTE_LAG)
        self.stop = ""  # this rank's reason to stop, waiting for the vote

    def account(self, batch: Batch) -> bool:
        """Count skipped samples, or stop: on every rank at once under data.on_error=raise.
        False when the batch holds no samples (a stream that gave up): while the ranks' vote is
        in flight (VOTE_LAG D steps) the caller trains on a stand-in batch; settle() stops the
        run before anything is saved."""
        stop = ""
        if batch.fatal:
            stop = f"data: {batch.fatal}; check the shards (gan-dist prepare --verify DIR)"
        elif batch.bad_count and self.on_error == "raise":
            stop = (f"bad sample in the data: {batch.bad_messages[0]}; re-prepare or remove it, "
                    "or set data.on_error=skip to skip such samples")
        if self.vote is not None:
            # A rank that stopped alone would leave the others waiting in DDP's next all-reduce.
            self.stop = self.stop or stop
            self._act(self.vote.vote(bool(stop)))
        elif stop:
            raise UserError(stop)
        self.num_good_samples += len(batch.keys)
        if batch.bad_count:
            self.num_bad_samples += batch.bad_count
            self.example = self.example or batch.bad_messages[0]
        return batch.samples is not None

    def settle(self) -> None:
        """Every rank, before a checkpoint or log line: act on every vote still in flight."""
        if self.vote is not None:
            self._act(self.vote.flush())

    def _act(self, any_rank_stopped: bool) -> None:
        if any_rank_stopped:
            raise UserError(self.stop or "another rank met a bad sample and stopped the run (its message is above)")

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
