"""Run train.py with a test fault installed as a trainer hook (never through the
environment): `python tests/fault_train.py kill@N <train.py args>` SIGKILLs rank 0 right
after optimizer step N (and its checkpoint, if one is due) — a real crash at a known point."""
import os
import runpy
import signal
import sys

import torch.distributed as dist

from minispin.run.resume import add_hook

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
kind, _, n = sys.argv[1].partition("@")
assert kind == "kill", sys.argv[1]


def kill_after(trainer, done):
    if done == int(n) and dist.get_rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)


add_hook("step_end", kill_after)
sys.argv = [os.path.join(REPO, "train.py")] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
