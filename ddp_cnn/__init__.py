"""ddp_cnn: data-parallel CNN training with from-scratch layers on NumPy/CuPy over MPI."""

__version__ = "0.1.0"
