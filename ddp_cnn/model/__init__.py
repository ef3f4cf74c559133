"""The network and what it computes with: layers (``layers``), the Sequential over flat parameter and gradient
buffers and the named architectures (``network``), the NumPy kernels and their compiled CPU and CUDA twins
(``kernels``, ``cpu_kernels``, ``cuda_kernels``), initialisers (``init``), optimizers and LR schedules
(``optim``), and a network from a TOML file (``modelfile``).

May import ``ddp_cnn.system`` only: no communicator (SyncBN is handed its reducing function), no data, no run.
``ddp_cnn.model.Sequential`` and ``build`` are the public names, re-exported here."""
from ddp_cnn.model.network import ARCHITECTURES, LAYER_TYPES, Sequential, build, from_description  # noqa: F401
