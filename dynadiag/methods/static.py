"""Static sparse training: a fixed random unstructured mask drawn at initialisation (the simplest DST baseline)."""

from __future__ import annotations

from dynadiag.methods.masks import MaskedMethod

__all__ = ["StaticMethod"]


class StaticMethod(MaskedMethod):
    """A random mask per layer, drawn once in ``apply_`` with the layer-wise density of ``distribution``.

    Takes the :class:`~dynadiag.methods.masks.MaskedMethod` arguments (a ``MaskSparsifyConfig`` and a seed); the
    mask never changes.
    """

    name = "static"
