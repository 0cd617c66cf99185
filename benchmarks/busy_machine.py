"""The quickstart's first epoch on an idle and on a busy machine, per thread policy, side by side.

    python benchmarks/busy_machine.py [--busy 2] [--max-train 3200] [--rounds 2] [--publish]

The quickstart's CPU command (`--preset report --model small_cnn`, one epoch of `--max-train`
images, the real CIFAR-10 of data/ or DIST_CIFAR_DATA) runs as its own process, in rounds that
interleave four cases so drift of the shared machine hits all alike:

  idle                       nothing beside it; the trainer's default threads
  busy, default threads      --busy processes spinning beside it (pure Python loops, one core
                             each), the trainer's default: CPUs less the machine's load (host.py)
  busy, 1 thread per CPU     the same load, torch's own default (--threads = CPUs)
  busy, passive wait         one thread per CPU with OMP_WAIT_POLICY=PASSIVE (threads sleep
                             instead of spinning while they wait)

It reports each case's median `epoch_time_s` (the training pass, from metrics.jsonl) and its
ratio to idle. OMP_NUM_THREADS is removed from the trainer's environment (a set one decides).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (add_output_flags, busy_warning, data_label, local_cifar, output_path, provenance,
                    report_warnings, run_trainer, spread_warning, table, write_json)

CPUS = os.cpu_count() or 1
CASES = {  # name -> (busy?, extra trainer flags, extra environment)
    "idle": (False, [], {}),
    "busy, default threads": (True, [], {}),
    f"busy, {CPUS} threads (torch's default)": (True, ["--threads", str(CPUS)], {}),
    f"busy, {CPUS} threads, passive wait": (True, ["--threads", str(CPUS)], {"OMP_WAIT_POLICY": "PASSIVE"}),
}


def spinners(count: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    time.sleep(5)  # long enough for the run queue (and a little of the load average) to show them
    return procs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--busy", type=int, default=2, help="busy processes beside the busy cases")
    p.add_argument("--max-train", type=int, default=3200, help="training images of the epoch (batch 32)")
    p.add_argument("--rounds", type=int, default=2)
    add_output_flags(p, "busy_machine_cpu.json")
    args = p.parse_args(argv)
    data = local_cifar()
    if not data:
        print("error: no CIFAR-10 in data/ (or DIST_CIFAR_DATA): this benchmark times the quickstart on the real data",
              file=sys.stderr)
        return 2
    warnings = [busy_warning()]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    flags = ["--preset", "report", "--model", "small_cnn", *data, "--epochs", "1", "--max-train",
             str(args.max_train), "--no-final-eval", "--no-save-best"]
    times: dict[str, list[float]] = {name: [] for name in CASES}
    threads: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name, (busy, extra, extra_env) in CASES.items():
                load = spinners(args.busy) if busy else []
                try:
                    out = Path(tmp) / f"r{round_}-{len(times[name])}-{abs(hash(name))}"
                    record = run_trainer([*flags, *extra], out, env={**env, **extra_env})[0]
                finally:
                    for proc in load:
                        proc.kill()
                        proc.wait()
                times[name].append(record["epoch_time_s"])
                threads[name] = __import__("json").loads((out / "config.json").read_text())["threads"]
                print(f"round {round_ + 1}: {name}: {record['epoch_time_s']:.2f} s ({threads[name]} thread(s))",
                      flush=True)
                if not busy:
                    time.sleep(5)  # let the load average fall back between cases
    idle = statistics.median(times["idle"])
    rows = [{"case": name, "threads": threads[name], "epoch_time_s": statistics.median(t),
             "vs_idle": statistics.median(t) / idle, "runs": len(t)} for name, t in times.items()]
    print(data_label(data))
    print(f"quickstart's first epoch ({args.max_train} images, batch 32) on {CPUS} CPUs, {args.busy} busy processes "
          f"in the busy cases, median of {args.rounds}:")
    print(table(rows, ["case", "threads", "epoch_time_s", "vs_idle", "runs"]))
    warnings += [spread_warning(name, t) for name, t in times.items()]
    kept = report_warnings(warnings)
    write_json(output_path(args, "busy_machine_cpu.json"),
               {"benchmark": "busy_machine", "provenance": provenance(), "args": vars(args), "data": data,
                "rows": rows, "samples": times, "warnings": kept})
    return 0


if __name__ == "__main__":
    sys.exit(main())
