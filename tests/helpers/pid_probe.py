"""Test plugin: each rank writes its pid to PROBE_DIR/pid-rank<R> once training has started."""

import os
from pathlib import Path

from gan_dist import trainer as trainer_mod

_g_phase = trainer_mod.Trainer.g_phase


def g_phase(self, *args):
    _g_phase(self, *args)
    if self.progress.step == 2 and "pid_probe" in self.cfg.plugins:  # the patch outlives its test
        out = Path(os.environ["PROBE_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"pid-rank{self.acc.process_index}").write_text(str(os.getpid()))


trainer_mod.Trainer.g_phase = g_phase
