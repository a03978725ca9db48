"""python judge.py: minispin-judge from a checkout (also under torchrun); the code is minispin/cli/judge.py."""
from minispin.cli.judge import main

if __name__ == "__main__":
    raise SystemExit(main())
