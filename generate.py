"""python generate.py: minispin-generate from a checkout (also under torchrun); the code is minispin/cli/generate.py."""
from minispin.cli.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
