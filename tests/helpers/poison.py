"""Test-only fault injection shared by the multi-process harnesses (importing it patches nothing)."""


def nan_on_rank1(trainer, batch_number: int = 3) -> None:
    """Rank 1's `batch_number`-th real batch becomes NaN: only that rank's D gradients are."""
    next_real, calls = trainer._next_real, [0]

    def poisoned(batches):
        x, y = next_real(batches)
        calls[0] += 1
        return (x * float("nan"), y) if calls[0] == batch_number and trainer.acc.process_index == 1 else (x, y)

    trainer._next_real = poisoned
