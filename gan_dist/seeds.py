"""One way to derive seeds, so that every random stream is reproducible and independent."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that mixes all parts (NumPy's SeedSequence hashing), e.g.
    (train.seed, GLOBAL rank, purpose[, worker]): distinct parts give unrelated streams."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)
