"""``python -m ddp_cnn.supervise``: the program is :mod:`ddp_cnn.cli.supervise`."""
import sys

from ddp_cnn.cli.supervise import main

if __name__ == "__main__":
    sys.exit(main())
