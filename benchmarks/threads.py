"""Several adkit processes on one machine: wall time of N copies of a command run one after the other, and started
together, with adkit's shared threads (the default) and with every process taking all the cores (ADKIT_THREADS set
to the core count, as torch does by itself).

    python benchmarks/threads.py --copies 3 -- adkit synth --category carpet --size 256
    python benchmarks/threads.py --copies 3 -- adkit run --detector padim --data synthetic --category carpet

Each copy gets its own --out (a fresh folder under a temporary directory) appended to the command, and all copies
share one ADKIT_CACHE so that they see each other. Prints one JSON line per mode.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_copies(command: list[str], copies: int, together: bool, env: dict[str, str], work: Path) -> float:
    started = time.perf_counter()
    procs = []
    for i in range(copies):
        out = work / f"out-{time.monotonic_ns()}-{i}"
        proc = subprocess.Popen([*command, "--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if together:
            procs.append(proc)
        elif proc.wait() != 0:
            raise SystemExit(f"{' '.join(command)} failed")
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"{' '.join(command)} failed")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command after --")
    args = parser.parse_args()
    command = [c for c in args.command if c != "--"]
    if not command:
        raise SystemExit("give the command after --")
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = {**os.environ, "ADKIT_CACHE": str(work / "cache")}
        base.pop("ADKIT_THREADS", None)
        run_copies(command, 1, False, base, work)  # warm-up: caches, file system
        for mode, env in (("shared threads (default)", base),
                          ("every process all cores", {**base, "ADKIT_THREADS": str(cores)})):
            sequential = run_copies(command, args.copies, False, env, work)
            together = run_copies(command, args.copies, True, env, work)
            print(json.dumps({"mode": mode, "cores": cores, "copies": args.copies, "command": " ".join(command),
                              "sequential_s": round(sequential, 1), "together_s": round(together, 1),
                              "ratio": round(together / sequential, 2)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
