"""The study's fixes and the measurements around them: the judge (judge.py), the swap rule
and the adaptive plan (fixes.py), the lm-eval backend (evaluation.py) and the held-out
check (heldout.py). They import the core and the run."""
