"""The Cityscapes label table: label ids (what the files and the official evaluator hold) ↔ the 19 train ids (what the
network predicts), from cityscapesscripts' own table (``cityscapesscripts.helpers.labels``); every id that is ignored
in evaluation maps to :data:`IGNORE_INDEX`."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from dints3d.utils.errors import DintsError

IGNORE_INDEX = 255
NUM_CLASSES = 19


def _cityscapes_labels():
    try:  # cityscapesscripts: optional (the cityscapes extra), so imported where it is used
        from cityscapesscripts.helpers.labels import labels
    except ImportError:
        raise DintsError("cityscapesscripts", "is not installed; pip install 'dints3d[cityscapes]'") from None
    return labels


@lru_cache(maxsize=1)
def train_id_table() -> np.ndarray:
    """Label id → train id [256] uint8 (:data:`IGNORE_INDEX` for ignored and unknown ids)."""
    table = np.full(256, IGNORE_INDEX, np.uint8)
    for label in _cityscapes_labels():
        if 0 <= label.id < 256 and 0 <= label.trainId < NUM_CLASSES and not label.ignoreInEval:
            table[label.id] = label.trainId
    return table


@lru_cache(maxsize=1)
def label_id_table() -> np.ndarray:
    """Train id → label id [256] uint8, the first label with that train id as cityscapesscripts' ``trainId2label``;
    train ids without a class (19…255) map to 0, ``unlabeled``."""
    table = np.zeros(256, np.uint8)
    for label in reversed(_cityscapes_labels()):
        if 0 <= label.trainId < NUM_CLASSES and label.id >= 0:
            table[label.trainId] = label.id
    return table


@lru_cache(maxsize=1)
def known_label_ids() -> frozenset[int]:
    return frozenset(label.id for label in _cityscapes_labels() if label.id >= 0)


def class_names() -> list[str]:
    """The 19 evaluated classes in train-id order (``road``, ``sidewalk``, …, ``bicycle``)."""
    names = {label.trainId: label.name for label in _cityscapes_labels() if 0 <= label.trainId < NUM_CLASSES}
    return [names[i] for i in range(NUM_CLASSES)]


def to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Label ids (any integer array) → train ids uint8, ignored ids → :data:`IGNORE_INDEX`."""
    return train_id_table()[np.asarray(label_ids).astype(np.int64).clip(0, 255)]


def to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Train ids → label ids uint8 (what the official evaluator reads)."""
    return label_id_table()[np.asarray(train_ids).astype(np.int64).clip(0, 255)]
