"""Bad samples during training: counted and reported, or a stop that every rank makes together.

The stream never turns a bad sample into a tensor (stream.py); it hands the trainer a count
and an example with the next batch. Here those become `Data/bad_samples` (summed over ranks)
and `Data/bad_fraction` per log interval, a loud warning above 1%, or, under
data.on_error=raise, a stop with the shard and key. Storage failures are counted apart
(`Data/shard_failures`, `Data/shard_retries`): the stream retries them itself, and only a shard
that never comes back ends a stream (a fatal batch). Then, under data.on_error=skip, the ranks
learn of it at the next log line or checkpoint and all stop there, naming the shard.
"""

from __future__ import annotations

import torch

from gan_dist.data.stream import Batch
from gan_dist.errors import UserError

WARN_FRACTION = 0.01
VOTE_LAG = 2  # D steps: the host may run that far ahead of the device before a vote is read
COUNTERS = {"Data/shard_failures": "shard_failures", "Data/shard_retries": "shard_retries",
            "Data/read_MiB": "read_bytes"}


class DataHealth:
    def __init__(self, on_error: str, accelerator, console):
        self.on_error, self.acc, self.console = on_error, accelerator, console
        self.num_bad_samples = self.num_good_samples = 0  # this rank, since the last log line
        self.counts = dict.fromkeys(COUNTERS, 0)
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
        elif stop and self.acc.num_processes > 1:
            self.stop = self.stop or stop  # on_error=skip: a lost shard, stopped at settle()
        elif stop:
            raise UserError(stop)
        for name in self.counts:
            self.counts[name] += getattr(batch, COUNTERS[name])
        self.num_good_samples += len(batch.keys)
        if batch.bad_count:
            self.num_bad_samples += batch.bad_count
            self.example = self.example or batch.bad_messages[0]
        return batch.samples is not None

    def settle(self) -> None:
        """Every rank, before a checkpoint or log line: act on every vote still in flight."""
        if self.vote is not None:
            self._act(self.vote.flush())
        elif self.acc.num_processes > 1:
            import torch.distributed as dist

            flag = torch.tensor([float(bool(self.stop))], device=self.acc.device)
            dist.all_reduce(flag)  # one per log line and checkpoint, under data.on_error=skip
            self._act(bool(flag.item()))

    def _act(self, any_rank_stopped: bool) -> None:
        """Every rank, on the same vote: stop all with the same message, naming the shard."""
        if any_rank_stopped:
            import torch.distributed as dist

            reasons = [None] * self.acc.num_processes
            dist.all_gather_object(reasons, self.stop)  # once, at the end of the run
            stopped = [rank for rank, reason in enumerate(reasons) if reason]
            raise UserError(f"rank {stopped[0]}: {reasons[stopped[0]]}" if self.acc.num_processes > 1 else reasons[0])

    def report(self, stats) -> None:
        """Before the interval's reduce: this rank's counts join the statistics."""
        seen = self.num_bad_samples + self.num_good_samples
        device = self.acc.device
        stats.report("Data/bad_samples", torch.tensor(float(self.num_bad_samples), device=device))
        stats.report("Data/bad_fraction", torch.tensor(self.num_bad_samples / max(1, seen), device=device))
        for name, value in self.counts.items():
            stats.report(name, torch.tensor(float(value) / (2**20 if name == "Data/read_MiB" else 1), device=device))
        self.num_bad_samples = self.num_good_samples = 0
        self.counts = dict.fromkeys(COUNTERS, 0)

    def after_reduce(self, values: dict) -> None:
        # Means over ranks of per-rank counts; the log wants the total.
        values["Data/bad_samples"] = round(values["Data/bad_samples"] * self.acc.num_processes)
        for name in COUNTERS:
            values[name] = values[name] * self.acc.num_processes
            values[name] = round(values[name], 1) if name == "Data/read_MiB" else round(values[name])
        if values["Data/shard_failures"]:
            self.console.warn(f"{values['Data/shard_failures']} shard reads failed since the last log line and were "
                              f"deferred, {values['Data/shard_retries']} retries (data.shard_retries per piece)")
        if values["Data/bad_fraction"] > WARN_FRACTION:
            self.console.warn(f"{values['Data/bad_fraction']:.1%} of the samples read since the last log line "
                              f"were unreadable and skipped ({values['Data/bad_samples']} in all), e.g. "
                              f"{self.example or 'on another rank'}; check the shards with "
                              "gan-dist prepare --verify DIR")
        self.example = ""
