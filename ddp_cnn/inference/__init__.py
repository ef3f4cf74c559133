"""Using a trained model: a model from a checkpoint or an exported ``.npz`` (``models``: one model-from-
description for both), its pixel statistics and class names, probabilities and the top classes; and a trained
model as the teacher of another run (``distill``).

May import ``system``, ``model``, ``data`` and ``run`` (a checkpoint's format); never a command line.
``from ddp_cnn.inference import load, normalize, probabilities`` is the public way in, re-exported here."""
from ddp_cnn.inference.models import (NPZ_FORMAT, NPZ_VERSION, load, load_model, load_model_from_checkpoint,  # noqa: F401
                                      normalize, pixel_stats_of, probabilities, top_k)
