import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread for the whole suite, and for the subprocesses it starts: the test
# models are tiny, and on a shared 2-core machine OpenMP threads of tiny matmuls wait on
# each other (runs took 5-20x longer with two), while results are the same.
os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)

# A shell without job control starts background commands (`pytest ... &`, `nohup ... &`)
# with SIGINT ignored, and Python then installs no Ctrl-C handler. The judge's Ctrl-C tests
# would fail there for a reason that is not the judge's. Put the handler back: the children
# these tests start then get SIGINT's default disposition at exec and install their own.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: a test that takes seconds or more (a torchrun launch, a real model, a "
        "wheel build, a whole CLI run); `pytest -m \"not slow\"` is the fast tier")
