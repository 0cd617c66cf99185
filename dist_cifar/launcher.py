"""torchrun that keeps a graceful stop graceful: what the launch scripts and SLURM start.

    python -m dist_cifar.launcher --standalone --nproc_per_node=2 -m dist_cifar.train ARGS
    python -m dist_cifar.launcher --stop JOBID.STEP        (SLURM: stop that step's launchers here)

It is torchrun itself (the same arguments, run in this process), with two differences:

- SIGTERM, SIGINT (Ctrl-C), SIGUSR1 and SIGHUP are passed to the workers as SIGTERM, and the agent
  keeps watching them while they agree on a step, checkpoint and exit 75. Plain torchrun raises its
  own exception on the signal instead, waits `--shutdown-timeout` seconds and exits 1 with a
  traceback. A second signal stops at once (SIGKILL to the workers; the newest committed
  checkpoint is kept, exit 130).
- Workers that all exited 75 (preempted, checkpoint written) make this process exit 75 with one
  line, where torchrun reports a failure. Any other failure is torchrun's own report and code.

`--stop` exists because SLURM's way to signal a step (`scancel --signal=TERM JOB.0`) reaches every
process of it, W&B's service included, which then dies before the run's last rows are saved:
`--stop` signals only the launchers of the step on its node (`srun --overlap` runs it on each).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

EXIT_PREEMPTED = 75  # dist_cifar.preemption's; not imported, so that this starts without torch's import cost twice
EXIT_INTERRUPTED = 130
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (torchrun's workers, when `pid` is this agent)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def signal_workers(sig: int, *, group: bool = False) -> int:
    """Signal each worker (its process group with `group`: its data-loading children too)."""
    sent = 0
    for pid in children(os.getpid()):
        try:
            os.killpg(pid, sig) if group else os.kill(pid, sig)
            sent += 1
        except (ProcessLookupError, PermissionError):
            pass
    return sent


class Stops:
    """Counts stop signals: the first asks the workers to checkpoint, the second kills them."""

    def __init__(self):
        self.count = 0

    def install(self) -> "Stops":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        if self.count == 1:
            n = signal_workers(signal.SIGTERM)
            say(f"got {name}: asked {n} worker(s) to checkpoint and stop (send it again to stop at once)")
        elif self.count == 2:
            signal_workers(signal.SIGKILL, group=True)
            say(f"got {name} again: stopped the workers at once; the newest committed checkpoint is kept")


def say(message: str) -> None:
    print(f"[launch] {message}", file=sys.stderr, flush=True)


def preempted() -> int:
    say(f"preempted: the workers checkpointed and exited {EXIT_PREEMPTED}; run the same command again to resume")
    return EXIT_PREEMPTED


def workers_exit_codes(folder: Path) -> list[int]:
    """What this node's workers wrote as their exit codes (train.main does, under this launcher)."""
    codes = []
    for entry in folder.glob("rank-*"):
        try:
            codes.append(int(entry.read_text().strip()))
        except (OSError, ValueError):
            continue
    return codes


def run_agent(argv: list[str]) -> int:
    """torchrun in this process; the workers' own exit codes decide where torchrun's do not (a
    peer node's agent may have gone with its store once its workers exited 75)."""
    import shutil
    import tempfile
    folder = Path(tempfile.mkdtemp(prefix="dist_cifar-launch-"))  # private (0700), unpredictable
    os.environ["DIST_CIFAR_EXIT_DIR"] = str(folder)
    try:
        return agent(argv, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def agent(argv: list[str], folder: Path) -> int:
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run
    args = parse_args(argv)
    # torchrun's own handlers would turn the signal into an exception that ends the agent; ours
    # let it keep watching the workers stop. A torch that cannot be told so (before
    # --signals-to-handle) keeps its handlers: it forwards the signal and raises, caught below.
    args.signals_to_handle = "SIGQUIT"
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGQUIT"
    os.environ["DIST_CIFAR_LAUNCHER"] = "1"  # the workers: no torchrun grace applies to their stop
    stops = Stops().install()

    def checkpointed() -> bool:
        codes = workers_exit_codes(folder)
        return bool(codes) and all(code == EXIT_PREEMPTED for code in codes)

    try:
        run(args)
    except ChildFailedError:
        if stops.count >= 2:
            return EXIT_INTERRUPTED
        # the workers' own codes, not torchrun's: once one has exited 75, torchrun SIGTERMs the
        # others, and one still tearing down dies of it (without writing a code) after the
        # checkpoint every rank committed
        if checkpointed():
            return preempted()
        raise
    except (RendezvousError, DistError) as exc:  # a node that never came, a wrong endpoint: one line, no traceback
        if checkpointed():  # the node holding the store has gone, after its workers (and ours) exited 75
            return preempted()
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        say(f"the rendezvous failed ({type(exc).__name__}: {first}): start every node with the same endpoint "
            f"(--rdzv-endpoint {args.rdzv_endpoint or '?'}) and id within the join timeout, and check that the "
            f"first node is reachable on that port")
        return 1
    except SignalException as exc:  # a torch without --signals-to-handle: its handlers won
        say(f"torchrun got {exc.sigval.name} and stopped its workers (asked to checkpoint first)")
        return preempted() if checkpointed() else 1
    return EXIT_INTERRUPTED if stops.count >= 2 else 0


def stop_step(step: str) -> int:
    """SIGTERM to this node's launchers of SLURM step `step` (their workers then checkpoint)."""
    listed = subprocess.run(["scontrol", "listpids", step], capture_output=True, text=True, timeout=30).stdout
    pids = {int(line.split()[0]) for line in listed.splitlines()[1:] if line.split() and line.split()[0].isdigit()}
    stopped = 0
    for pid in sorted(pids):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"dist_cifar.launcher" in argv and b"--stop" not in argv:
            try:
                os.kill(pid, signal.SIGTERM)
                stopped += 1
            except ProcessLookupError:
                pass
    say(f"{os.uname().nodename}: asked {stopped} launcher(s) of step {step} to stop")
    return 0 if stopped else 1


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--stop"]:
        if len(argv) != 2:
            say("usage: python -m dist_cifar.launcher --stop JOBID.STEP")
            return 2
        return stop_step(argv[1])
    return run_agent(argv)


if __name__ == "__main__":
    sys.exit(main())
