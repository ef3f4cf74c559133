"""``python -m ddp_cnn.evaluate``: the program is :mod:`ddp_cnn.cli.evaluate`."""
import sys

from ddp_cnn.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
