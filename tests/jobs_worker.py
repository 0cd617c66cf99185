"""Run several trainer jobs, one after another, inside one torchrun launch (or one process).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/jobs_worker.py JOBS.json OUT_DIR

JOBS.json is a list of {"name", "argv", "env"[, "entry"]}: each job is `dist_cifar.train.main(argv)`
(or `dist_cifar.<entry>.main`, e.g. evaluate) with `env`
set for its duration (DIST_CIFAR_FAULT, ...), its stdout and stderr captured. Every rank writes
OUT_DIR/rank<R>.json: [{"name", "code", "stdout", "stderr", "seconds"}], one entry per job.

The real entry point runs each time (its own process group, out dir, checkpoints and resume);
what one launch saves is the interpreter start, the imports and torchrun's rendezvous, which on
two cores cost more than the small jobs themselves.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path


def run_job(job: dict) -> dict:
    import importlib
    import torch._dynamo
    main = importlib.import_module(f"dist_cifar.{job.get('entry', 'train')}").main  # train, or evaluate
    torch._dynamo.reset()  # each job compiles its own model (and stays under dynamo's cache limit)
    saved = {key: os.environ.get(key) for key in job.get("env", {})}
    os.environ.update(job.get("env", {}))
    out, err = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            # torchrun's @record wants a real stderr for its fault handler; a StringIO has no fileno
            warnings.filterwarnings("ignore", message="Unable to enable fault handler")
            code = main(job["argv"])
    except BaseException:  # an escaping exception is a result too (a traceback the test can show)
        code = "exception"
        err.write(traceback.format_exc())
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return {"name": job["name"], "code": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
            "seconds": time.perf_counter() - started}


def main() -> int:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(sys.argv[2])
    rank = int(os.environ.get("RANK", "0"))
    results = []
    for job in jobs:
        results.append(run_job(job))
        (out_dir / f"rank{rank}.json").write_text(json.dumps(results))  # what ran so far, if a job hangs
    return 0


if __name__ == "__main__":
    sys.exit(main())
