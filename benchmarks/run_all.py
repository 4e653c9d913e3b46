"""Run every benchmark script in turn (same flags), then plot the CSVs they wrote.

    python benchmarks/run_all.py --quick      # what `make bench` runs on a CPU
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_info_nce.py", "bench_similarity.py", "bench_pgd.py", "bench_train_step.py"]


def main() -> int:
    args = sys.argv[1:]
    started = time.time()
    failed = []
    for script in SCRIPTS:
        print(f"== {script} {' '.join(args)}", flush=True)
        if subprocess.run([sys.executable, str(HERE / script), *args]).returncode != 0:
            failed.append(script)
    new = [p for p in (HERE / "results").glob("*.csv") if p.stat().st_mtime >= started]
    if new:
        subprocess.run([sys.executable, str(HERE / "plot.py"), *map(str, new)], check=False)
    if failed:
        print(f"FAILED: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
