"""Training statistics that stay on the device until the log interval.

`report` only appends the (detached) tensor; `reduce` stacks everything, makes one
all-reduce across ranks, and returns plain floats. No `.item()` in the hot loop.
"""

from __future__ import annotations

from collections import defaultdict

import torch


class Stats:
    def __init__(self):
        self._values: dict[str, list[torch.Tensor]] = defaultdict(list)

    def report(self, name: str, value: torch.Tensor) -> None:
        self._values[name].append(value.detach().float().reshape(()))

    def reduce(self, accelerator) -> dict[str, float]:
        """Means over the interval and over all ranks (every rank must call this)."""
        names = sorted(self._values)
        if not names:
            return {}
        # Per name: (count, sum); one flat tensor so one collective covers all names.
        parts = [torch.stack([torch.tensor(float(len(self._values[n])), device=self._values[n][0].device),
                              torch.stack(self._values[n]).sum()]) for n in names]
        flat = torch.cat(parts)
        if accelerator.num_processes > 1:
            flat = accelerator.reduce(flat, reduction="sum")
        flat = flat.view(-1, 2).cpu()
        self._values.clear()
        return {name: float(s / c) for name, (c, s) in zip(names, flat.tolist())}
