"""CPU threads: 1 vs 2, as the machine is and with two more busy processes, MNIST MLP and
SimpleCNN; samples/s from each run's summary (regexp.run, 1 epoch, monitor=off, logger=none).

    REGEXP_DATA_DIR=/path/to/data python scripts/threads_table.py [rows.json]
"""
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time

import regexp


def busy(stop):
    """Another process holding a core."""
    x = 0
    while not stop.is_set():
        x += 1

OUT = tempfile.mkdtemp(prefix="regexp-threads-")
MODELS = {"mlp": ["model=mlp", "dataset.limit=8192"], "cnn": ["model=cnn", "dataset.limit=2048"]}
rows = []
for load in ("idle", "loaded"):
    stop = mp.Event(); procs = []
    if load == "loaded":
        procs = [mp.Process(target=busy, args=(stop,)) for _ in range(2)]
        for p in procs: p.start()
        time.sleep(2)
    for model, extra in MODELS.items():
        for threads in (1, 2):
            rates = []
            for rep in range(2):
                s = regexp.run([*extra, "epochs=1", "logger=none", "monitor=off", "dataset.val_size=256", f"device.threads={threads}", "batch_size=128"],
                               run_dir=f"{OUT}/{load}-{model}-{threads}-{rep}")
                rates.append(s.metrics["perf/samples_per_s"])
            rows.append({"load": load, "model": model, "threads": threads, "samples_per_s": max(rates), "loadavg": os.getloadavg()[0]})
            print(rows[-1], file=sys.stderr, flush=True)
    stop.set()
    for p in procs: p.join()
json.dump(rows, open(sys.argv[1] if len(sys.argv) > 1 else "threads_rows.json", "w"), indent=1)
