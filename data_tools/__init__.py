"""data_tools: turn IDX image/label files, folders of images or .npz arrays into per-rank HDF5 shards, and check them.

Command-line tools, each a module with a ``main(argv)``:

* ``python -m data_tools.shard``    IDX (MNIST-style), a folder of class subfolders of images, or an
  .npz -> ``train-0000r-of-0000N.h5`` + ``test.h5`` (``images.py`` reads the images)
* ``python -m data_tools.verify``   counts, disjointness, coverage, hashes, attributes
* ``python -m data_tools.inspect``  summary of one file, optionally a picture grid

Every tool reports bad input as one line ``error: ...`` on stderr and exit code 2.
"""
from data_tools.errors import DataError

__all__ = ["DataError"]
