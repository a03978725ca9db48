"""python evaluate.py: minispin-eval from a checkout (also under torchrun); the code is minispin/cli/evaluate.py."""
from minispin.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
