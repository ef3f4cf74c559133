"""``python -m ddp_cnn.export``: the program is :mod:`ddp_cnn.cli.export`."""
import sys

from ddp_cnn.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
