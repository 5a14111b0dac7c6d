"""Test plugin for multi-process runs: records what each rank saw and ends with.

Imported through `plugins=[rank_probe]`; writes PROBE_DIR/rank<R>.pt with the rank's first
noise batch, first data keys, world size and final G/D weights. Observation only: the
training path is the product's own.
"""

import os
from pathlib import Path

import numpy as np
import torch

from gan_dist import trainer as trainer_mod

_fit, _noise, _next_real = trainer_mod.Trainer.fit, trainer_mod.Trainer._noise, trainer_mod.Trainer._next_real


class _KeyRecorder:
    def __init__(self, loader, sink: dict):
        self.loader, self.sink = loader, sink

    def __iter__(self):
        for batch in self.loader:
            self.sink.setdefault("first_keys", np.asarray(batch[2]).tolist())
            yield batch


def fit(self):
    self.probe = {}
    self.data = _KeyRecorder(self.data, self.probe)
    _fit(self)
    out = Path(os.environ["PROBE_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    self.probe.update(world_size=self.acc.num_processes, rank=self.acc.process_index,
                      G={k: v.cpu() for k, v in self.acc.unwrap_model(self.G).state_dict().items()},
                      D={k: v.cpu() for k, v in self.acc.unwrap_model(self.D).state_dict().items()})
    torch.save(self.probe, out / f"rank{self.acc.process_index}.pt")


def noise(self, count):
    z, labels = _noise(self, count)
    if hasattr(self, "probe"):
        self.probe.setdefault("first_noise", z.cpu().clone())
    return z, labels


trainer_mod.Trainer.fit = fit
trainer_mod.Trainer._noise = noise
