"""A free TCP port below the kernel's ephemeral range, for the rendezvous (train.sh).

    python slurm/free_port.py JOB_ID

Ports the kernel hands out for outgoing connections and bind(0) lie in
/proc/sys/net/ipv4/ip_local_port_range; one chosen there can be taken by srun's own sockets
before the launcher binds it. The search starts at a place set by the job id, so two jobs
starting on one head node at the same moment try different ports first.
"""

import socket
import sys
from pathlib import Path

FIRST, LAST = 20000, 32767


def ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def main() -> int:
    job = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 0
    last = min(LAST, ephemeral_start() - 1)
    span = last - FIRST + 1
    for step in range(span):
        port = FIRST + (job * 7919 + step) % span
        with socket.socket() as probe:
            try:
                probe.bind(("", port))
            except OSError:
                continue
        print(port)
        return 0
    print(f"no free port in {FIRST}-{last}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
