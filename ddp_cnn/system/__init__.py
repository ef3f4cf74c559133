"""What the machine gives a run: the array library and device (``backend``: NumPy or CuPy, dtype, seeded
streams), host memory (``memory``), a full disk (``nospace``) and the timeline of every rank's steps (``trace``).

The bottom floor: imports nothing of ddp_cnn but itself."""
