"""Test plugin: from the 3rd batch on, the real images are NaN (so only D's gradients are).

NAN_REALS_COUNT (environment) limits how many batches are NaN (default: all from the 3rd).
"""

import os

from gan_dist import trainer as trainer_mod

_next_real = trainer_mod.Trainer._next_real


def nan_next_real(self, batches):
    x, y = _next_real(self, batches)
    if "nan_reals" not in self.cfg.plugins:  # the patch outlives the test that imported it
        return x, y
    self.nan_reals_calls = getattr(self, "nan_reals_calls", 0) + 1
    last = 3 + int(os.environ.get("NAN_REALS_COUNT", "1000000000"))
    return (x * float("nan"), y) if 3 <= self.nan_reals_calls < last else (x, y)


trainer_mod.Trainer._next_real = nan_next_real
