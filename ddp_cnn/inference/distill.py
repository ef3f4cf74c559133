"""Knowledge distillation (``train --teacher``): one object owns the teacher, its cache and its identity.

The loss (:class:`ddp_cnn.model.layers.SoftmaxCrossEntropy` with a distill weight)
needs the teacher's logits for each training batch.  Without augmentation
an image's soft targets never change, so the teacher labels each of the
rank's rows once and every step looks its batch up; with augmentation the
teacher runs on every (augmented) batch.
"""
from __future__ import annotations

import numpy as np


class Distiller:
    """The teacher model and what the loss, the logs and the checkpoints need of it."""

    def __init__(self, teacher, weight: float = 0.5, temperature: float = 4.0):
        self.teacher, self.weight, self.temperature = teacher, float(weight), float(temperature)
        self.source = getattr(teacher, "source", "a model")
        self.digest = getattr(teacher, "digest", None)
        self.record = {"source": self.source, "sha256": self.digest,
                       "describe": f"{teacher.name}, {teacher.num_params:,} params"}
        self.cache = None  # the teacher's logits by data row, when nothing augments the batches

    @classmethod
    def load(cls, path, backend, student, class_names, data_attrs, weight=0.5, temperature=4.0) -> "Distiller":
        """The teacher of checkpoint (or run folder) ``path``, checked against the student and its data."""
        from ddp_cnn.inference.models import load_teacher
        return cls(load_teacher(path, backend, student, class_names, data_attrs), weight, temperature)

    def cache_rows(self, loader) -> None:
        """Label every row of ``loader``'s data once (an unshuffled, un-augmented pass) and free the teacher."""
        parts = [self.teacher.forward(x, train=False).copy() for x, _ in loader.epoch(0)]
        self.cache = loader.xp.concatenate(parts) if parts else None
        self.teacher = None  # its logits are all it was needed for

    def targets(self, x, rows: np.ndarray | None = None):
        """The teacher's logits for batch ``x`` (whose data rows are ``rows``)."""
        if self.cache is not None:
            return self.cache[self.cache_xp.asarray(rows)]
        return self.teacher.forward(x, train=False)

    @property
    def cache_xp(self):
        from ddp_cnn.system.backend import array_module
        return array_module(self.cache)

    def describe(self) -> str:
        how = ("its logits computed once per image (no augmentation)" if self.cache is not None
               else "it runs on every (augmented) batch")
        return (f"distilling from {self.source} ({self.record['describe']}): weight {self.weight}, "
                f"temperature {self.temperature}; {how}")
