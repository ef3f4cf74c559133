"""``python -m ddp_cnn.predict``: the program is :mod:`ddp_cnn.cli.predict`."""
import sys

from ddp_cnn.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
