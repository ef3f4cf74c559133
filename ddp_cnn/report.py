"""``python -m ddp_cnn.report``: the program is :mod:`ddp_cnn.cli.report`."""
import sys

from ddp_cnn.cli.report import main

if __name__ == "__main__":
    sys.exit(main())
