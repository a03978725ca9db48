"""python train.py: minispin-train from a checkout (also under torchrun); the code is minispin/cli/train.py."""
from minispin.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
