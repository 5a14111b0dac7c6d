"""Test plugin: the 3rd batch never arrives (a stuck data worker), to test the step watchdog."""

import time

from gan_dist import trainer as trainer_mod

_next_real = trainer_mod.Trainer._next_real
_calls = [0]


def stuck_next_real(self, batches):
    _calls[0] += 1
    if _calls[0] == 3:
        time.sleep(600)
    return _next_real(self, batches)


trainer_mod.Trainer._next_real = stuck_next_real
