"""Serving under tensor parallelism: `vlstack serve --tp N` starts N processes, one per device. Rank 0 is the
server; the other ranks replay its engine's model calls (engine/mirror.py).

The processes are started and watched by `launch` (a supervisor): when one exits, it stops the others and
exits with the first one's code and a line naming it. Under torchrun (several machines: `torchrun --nnodes`),
each process is started by torchrun instead and `vlstack serve --tp N` runs as its rank.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], tp: int) -> int:
    """Start `vlstack ARGV` as ranks 0..tp-1 of one machine and watch them: when one exits, stop the others
    (SIGTERM, then SIGKILL after 10 s) and return the first exit code, naming the rank."""
    env = {
        **os.environ,
        "WORLD_SIZE": str(tp),
        "LOCAL_WORLD_SIZE": str(tp),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    command = [sys.executable, "-m", "vlstack.cli", *argv]
    procs = [subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(tp)]

    def stop(*_) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        ended = [(r, p.returncode) for r, p in enumerate(procs) if p.poll() is not None]
        if ended:
            break
        time.sleep(0.2)
    rank, code = ended[0]
    if any(p.poll() is None for p in procs):
        print(f"vlstack serve: rank {rank} exited (code {code}); stopping the other ranks", file=sys.stderr, flush=True)
    stop()
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return code if code >= 0 else 128 - code  # (killed by a signal: 128 + its number, as a shell says)
