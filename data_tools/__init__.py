"""data_tools: turn IDX image/label files into per-rank HDF5 shards, and check them.

Command-line tools, each a module with a ``main(argv)``:

* ``python -m data_tools.shard``    IDX (MNIST-style) -> ``train-0000r-of-0000N.h5`` + ``test.h5``
* ``python -m data_tools.verify``   counts, disjointness, coverage, hashes, attributes
* ``python -m data_tools.inspect``  summary of one file, optionally a picture grid

Every tool reports bad input as one line ``error: ...`` on stderr and exit code 2.
"""
from data_tools.errors import DataError

__all__ = ["DataError"]
