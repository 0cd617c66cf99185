"""Preemption: SIGUSR1 / SIGTERM / SIGINT only set a flag; the step loop acts on it.

A signal handler that saved a checkpoint itself would run at an arbitrary bytecode of an
arbitrary rank, mid-collective. Instead each rank's flag goes into the loop's agreement
all-reduce, so all ranks stop at the same step, save one checkpoint there and exit with
EXIT_PREEMPTED. Repeated signals are harmless: under SLURM a worker can get SIGTERM from slurmstepd and again
from torchrun, and must still checkpoint. Escalation is the launcher's job (torchrun sends
SIGKILL when workers outlive its grace period). Only a second SIGINT (Ctrl-C twice) stops at once.
"""
from __future__ import annotations

import os
import signal

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped early on purpose, a checkpoint holds the state
SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)  # SIGINT: Ctrl-C is a stop like any other


class StopNow(KeyboardInterrupt):
    """A second SIGINT: the user wants out at once, without waiting for a checkpoint."""


class PreemptionFlag:
    """Raised by SIGUSR1/SIGTERM/SIGINT, and, under torchrun, when the launcher itself has died (SIGKILL
    reaches only torchrun; its workers sit in their own sessions and would train on alone): the
    parent process changes, and the next agreement stops every rank with a checkpoint."""

    def __init__(self):
        self.signal_name = ""
        self.parent = os.getppid() if os.environ.get("TORCHELASTIC_RUN_ID") else None

    def __call__(self) -> bool:
        if not self.signal_name and self.parent is not None and os.getppid() != self.parent:
            self.raise_flag("torchrun died")
        return bool(self.signal_name)

    def raise_flag(self, name: str = "injected") -> None:
        self.signal_name = self.signal_name or name

    def install(self) -> "PreemptionFlag":
        for sig in SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise StopNow()
        self.raise_flag(signal.Signals(signum).name)

    def uninstall(self) -> None:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
