"""Run every benchmark script in turn (same flags), then plot the CSVs they wrote.

    python benchmarks/run_all.py --quick      # what `make bench` runs on a CPU
    python benchmarks/run_all.py --skip bench_train_step.py   # all but the named scripts

The load average is printed before and after each script (timings on a shared machine are noisy;
ratios measured side by side in one script hold up better than absolute times).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_info_nce.py", "bench_similarity.py", "bench_pgd.py", "bench_train_step.py"]


def _load() -> str:
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> int:
    args = sys.argv[1:]
    skip: list[str] = []
    while "--skip" in args:  # --skip SCRIPT (repeatable); every other argument goes to the scripts
        i = args.index("--skip")
        skip.append(args[i + 1])
        del args[i:i + 2]
    started = time.time()
    failed = []
    for script in SCRIPTS:
        if script in skip:
            continue
        t0 = time.time()
        print(f"== {script} {' '.join(args)} ({_load()})", flush=True)
        if subprocess.run([sys.executable, str(HERE / script), *args]).returncode != 0:
            failed.append(script)
        print(f"== {script}: {time.time() - t0:.0f} s ({_load()})", flush=True)
    new = [p for p in (HERE / "results").glob("*.csv") if p.stat().st_mtime >= started]
    if new:
        subprocess.run([sys.executable, str(HERE / "plot.py"), *map(str, new)], check=False)
    print(f"== all: {time.time() - started:.0f} s")
    if failed:
        print(f"FAILED: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
