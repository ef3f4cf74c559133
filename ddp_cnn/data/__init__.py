"""The training data: the shard files and which rows a rank reads (``shards``), streamed chunks (``stream``),
the rank-count-independent global order (``order``), the pixels' augmentation and normalisation (``pixels``),
a rank's batches (``loader``) and a run's train/validation/test split (``splits``).

May import ``ddp_cnn.system`` and ``ddp_cnn.dist`` (ranks agree on the data); never the model or the run."""
