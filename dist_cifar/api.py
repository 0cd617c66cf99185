"""The Python API: train from a notebook or a script, and bring a model of your own.

    import dist_cifar
    from dist_cifar.models import register
    register("tiny", lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 10)))
    result = dist_cifar.run({"model": "tiny", "dataset": "synthetic", "epochs": 2})
    result.ok, result.out_dir, result.summary["best_test_accuracy"], result.metrics[-1]["val_loss"]

`run` takes a TrainConfig, a dict of fields (as the flags, underscores), or the path of a TOML /
JSON config file (a run's config.json reruns it), plus keyword overrides. It runs in this process
(one process; under torchrun each rank calls it) and returns a RunResult. A training failure that
has an exit code (bad settings or data 2, non-finite loss 3, replicas drifted 4, preempted 75) is
returned, never raised, its one line printed on stderr as the command line prints it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from . import files
from .config import ConfigError, TrainConfig, make_config, read_config_file


@dataclass
class RunResult:
    exit_code: int                       # as the command line's: 0 done, 2, 3, 4, 75, 130
    out_dir: Optional[Path]              # None when the run stopped before choosing one (bad settings)
    config: Optional[TrainConfig]        # the resolved config (None when it did not resolve)
    summary: dict = field(default_factory=dict)   # summary.json ({} before the final evaluation)
    metrics: list = field(default_factory=list)   # metrics.jsonl, one dict per epoch

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def as_config(config: Union[TrainConfig, dict, str, Path], overrides: dict[str, Any]) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return dataclasses.replace(config, **overrides) if overrides else config
    values = read_config_file(str(config)) if isinstance(config, (str, Path)) else dict(config)
    return make_config(**{**values, **overrides})


def run(config: Union[TrainConfig, dict, str, Path, None] = None, **overrides: Any) -> RunResult:
    """Train as `python -m dist_cifar.train` would with these settings; see the module docstring."""
    import sys
    from .runtime import resolve
    from .train import EXIT_USAGE, run_resolved
    try:
        cfg, notes = resolve(as_config(config if config is not None else {}, overrides))
    except (ConfigError, TypeError) as exc:  # TypeError: a field that TrainConfig does not have
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return RunResult(EXIT_USAGE, None, None)
    outcome = run_resolved(cfg, notes)
    result = RunResult(outcome.code, outcome.out_dir, cfg)
    if outcome.out_dir is not None:
        summary = outcome.out_dir / files.SUMMARY
        result.summary = files.read_json(summary) if summary.exists() else {}
        result.metrics = files.read_jsonl(outcome.out_dir / files.METRICS)
    return result
