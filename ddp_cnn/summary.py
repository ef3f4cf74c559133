"""``python -m ddp_cnn.summary``: the program is :mod:`ddp_cnn.cli.summary`."""
import sys

from ddp_cnn.cli.summary import main

if __name__ == "__main__":
    sys.exit(main())
