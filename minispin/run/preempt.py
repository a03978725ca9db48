"""How a run stops from outside: SIGTERM / SIGUSR1 from a scheduler, and a peer that stops
answering under torchrun. Both end with one line instead of lost work or a silent wait.

Signals. Schedulers (SLURM, Kubernetes, torchrun passing on its own SIGTERM) send SIGTERM or
SIGUSR1 some time before SIGKILL. Inside `handle_stop_signals()` (around a CLI's work):

- during the training loop (between `hold()` and `release()`) a signal is only noted: the
  optimizer step in flight finishes, every rank learns of it through `requested()` (one
  all-reduce per step, so ranks signalled at different moments stop at the same step), a
  checkpoint is saved on every rank, and the run stops with `Preempted`;
- anywhere else (generation, the judge, the reference pass, the export, the held-out check)
  `Preempted` is raised at once. Those stages keep what they finished (each record is
  appended as it is made, exports are renamed into place), so the re-run goes on from there.

`Preempted` is a StoppedError: the CLI prints its one line, the run lock is released by the
`with` that holds it, and the exit status is 128 + the signal number (143 for SIGTERM, 138
for SIGUSR1), what a shell reports for a process a signal ended, so a scheduler's requeue
rules read it as before.

Peers. `peer_timeouts(env)` turns a collective that waited past `dist_timeout` (gloo raises
"Timed out waiting ...") into one line naming the ranks that did not answer: each rank that
timed out writes its rank into the job's store (held by torchrun's agent, which outlives its
workers) and waits a moment for the others; the ranks that never write are named.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import List, Optional

import torch
import torch.distributed as dist

from .errors import StoppedError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
RESUME = "re-run the same command to resume"

_state = {"signal": 0, "held": 0}


class Preempted(StoppedError):
    """The run stopped on a scheduler's signal; the message says what was kept and how to go on."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _on_signal(signum, frame):
    _state["signal"] = signum
    if not _state["held"]:
        raise Preempted(signum, f"stopped by {signal_name(signum)}; every finished stage and record "
                                f"is kept (pairs, judge scores, reference log-probs, checkpoints): {RESUME}")


@contextlib.contextmanager
def handle_stop_signals():
    """SIGTERM and SIGUSR1 stop the body with Preempted (see the module docstring)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _on_signal) for s in STOP_SIGNALS}
    _state.update(signal=0, held=0)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _state.update(signal=0, held=0)


def hold():
    """From now on a stop signal waits for `requested()` (the training loop's step end)."""
    _state["held"] += 1


def release():
    """The loop is over: stop now if a signal came after the last step's check (the last
    step's checkpoint is saved)."""
    _state["held"] = max(0, _state["held"] - 1)
    if _state["signal"] and not _state["held"]:
        signum = _state["signal"]
        raise Preempted(signum, f"stopped by {signal_name(signum)} after the last training step, before "
                                f"the export (its checkpoint is saved): {RESUME}")


def requested(env) -> int:
    """The stop signal any rank received (0 if none). Collective: every rank calls it at the
    same point, so all stop after the same step."""
    flag = _state["signal"]
    if env.world_size > 1:
        t = torch.tensor([flag], dtype=torch.int64, device=env.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = int(t.item())
    return flag


def stopped_training(signum: int, done: int, total: int, checkpoint: str) -> Preempted:
    return Preempted(signum, f"stopped by {signal_name(signum)} after step {done} of {total}; "
                             f"checkpoint {checkpoint} saved on every rank: {RESUME}")


# ---------------------------------------------------------------------- peers
class PeerTimeout(StoppedError):
    """A collective waited longer than dist_timeout: a peer stopped answering."""


def _is_timeout(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and ("Timed out" in str(e) or "timed out" in str(e))


def silent_ranks(env, wait_s: float) -> List[int]:
    """Ranks that do not report a timeout of their own within wait_s: the ones not answering."""
    store = dist.distributed_c10d._get_default_store()
    store.set(f"minispin/timed_out/{env.rank}", "1")
    others = [r for r in range(env.world_size) if r != env.rank]
    deadline = time.monotonic() + wait_s
    while True:
        silent = [r for r in others if not store.check([f"minispin/timed_out/{r}"])]
        if not silent or time.monotonic() >= deadline:
            return silent
        time.sleep(0.2)


@contextlib.contextmanager
def peer_timeouts(env, timeout_s: float):
    """A collective that timed out becomes one line naming the ranks that stopped answering."""
    try:
        yield
    except RuntimeError as e:
        if env.world_size <= 1 or not _is_timeout(e):
            raise
        try:
            silent: Optional[List[int]] = silent_ranks(env, min(timeout_s, 5.0))
        except Exception:   # the store is gone too: say what is known
            silent = None
        who = (f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} of {env.world_size}"
               if silent else "another rank")
        raise PeerTimeout(f"rank {env.rank}: {who} stopped answering: a collective waited more than "
                          f"dist_timeout = {timeout_s:g} s for it (check that rank's node and log; "
                          f"{RESUME} from its last checkpoint, or raise --dist-timeout if a rank "
                          "legitimately works alone that long)") from e


@contextlib.contextmanager
def stoppable(env, dist_timeout_s: float):
    """A CLI's work under both rules: stop signals (handle_stop_signals) and peer timeouts."""
    with handle_stop_signals(), peer_timeouts(env, dist_timeout_s):
        yield
