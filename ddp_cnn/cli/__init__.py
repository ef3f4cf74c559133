"""The command-line programs — ``train``, ``evaluate``, ``predict``, ``export``, ``summary``, ``report``,
``supervise`` — and their argument types (``argtypes``).  ``python -m ddp_cnn.train`` (and so on) runs them
through the seven-line modules of the same names at the top of the package.

The top floor: may import anything of ddp_cnn; nothing in the library imports it."""
