"""Many processes as one job: the communicators (``comm``: one process, MPI, NCCL, ULFM's shrink), what the
launcher's environment says (``launcher``), the gradient buckets and the step's stop flag (``reducer``), and
what a failure does (``faults``: exit codes, abort, deadlines, errors agreed by every rank).

May import ``ddp_cnn.system`` only; the model and the data never depend on it for their arithmetic."""
