"""One torchrun worker of benchmarks/resume_memory.py: the real trainer's main, then this rank's
peak resident memory (VmHWM) on stdout as `PEAK_RSS <rank> <kB>`."""
import os
import sys

from dist_cifar.train import main

if __name__ == "__main__":
    code = main(sys.argv[1:])
    peak = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    sys.stdout.write(f"\nPEAK_RSS {os.environ.get('RANK', '0')} {peak} END\n")  # one write: whole among the other ranks' lines
    sys.stdout.flush()
    sys.exit(code)
