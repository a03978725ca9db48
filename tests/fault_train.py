"""Run train.py with a test fault installed as a trainer hook (never through the
environment): `python tests/fault_train.py FAULT <train.py args>`, FAULT one of

    kill@N    SIGKILL rank 0 right after optimizer step N (and its checkpoint, if one is due):
              a real crash at a known point
    term@N    after step N, rank 0 sends SIGTERM to torchrun (its parent; itself under plain
              python), as a scheduler does, and waits until torchrun has passed it on
    stall@N   after step N, rank 1 stops answering (sleeps; SIGTERM still ends it, so
              torchrun can clean up)
    pause@N:FILE  after step N, rank 0 creates FILE.paused and waits until FILE exists: a run
              held mid-training while a test does something beside it
"""
import os
import runpy
import signal
import sys
import time

import torch.distributed as dist

from minispin.run.resume import add_hook

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
kind, _, n = sys.argv[1].partition("@")
n, _, go = n.partition(":")
assert kind in ("kill", "term", "stall", "pause"), sys.argv[1]


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def kill_after(trainer, done):
    if done == int(n) and rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)


def term_after(trainer, done):
    from minispin.run import preempt
    if done == int(n) and rank() == 0:
        os.kill(os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not preempt._state["signal"] and time.monotonic() < deadline:
            time.sleep(0.05)


def stall_after(trainer, done):
    if done == int(n) and rank() == 1:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(3600)


def pause_after(trainer, done):
    if done == int(n) and rank() == 0:
        open(go + ".paused", "w").close()
        while not os.path.exists(go):
            time.sleep(0.05)


add_hook("step_end", {"kill": kill_after, "term": term_after, "stall": stall_after, "pause": pause_after}[kind])
sys.argv = [os.path.join(REPO, "train.py")] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
