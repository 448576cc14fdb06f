"""Markers for model inputs that are not "a tensor whose first dimension is the batch". No torch here.

``Samples([...])`` is a list of per-sample items (tensors of different sizes, dicts of targets):
what detection models and variable-size image models take. It is passed to the model as a list,
and a batch of ``b`` is ``b`` samples, the example's repeated in turn (each a fresh copy).
"""

from __future__ import annotations

from typing import Any, Iterable


class Samples(list[Any]):
    """A list of per-sample items; batch ``b`` is ``b`` of them, repeated in turn from the example.

    ``optimal_batch(detector, Samples([image]))`` calls ``detector([image, image, ...])``;
    ``optimal_batch(detector, (Samples([image]), Samples([target])), mode="train")`` calls
    ``detector(images, targets)`` with as many targets as images.
    """

    def __init__(self, items: Iterable[Any] = ()):
        super().__init__(items)

    def __repr__(self) -> str:
        return f"Samples({list.__repr__(self)})"
