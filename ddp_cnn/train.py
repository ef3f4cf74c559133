"""``python -m ddp_cnn.train``: the program is :mod:`ddp_cnn.cli.train`."""
import sys

from ddp_cnn.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
