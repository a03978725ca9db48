"""python plot.py: minispin-plot from a checkout (also under torchrun); the code is minispin/cli/plot.py."""
from minispin.cli.plot import main

if __name__ == "__main__":
    raise SystemExit(main())
