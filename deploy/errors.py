"""Errors of the edge runtime; all are ``ValueError`` subclasses whose message names the file."""
from __future__ import annotations

from typing import Any


class DeployError(ValueError):
    """Base class of deploy errors."""


class BundleError(DeployError):
    """A deploy bundle that is missing, incomplete, tampered with or not understood."""


class InputVolumeError(DeployError):
    """An input volume that cannot be segmented (not 3D, empty, non-finite, unreadable)."""


class ImplausibleInputError(InputVolumeError):
    """A readable volume that does not look like the CT the model was trained for (not HU, no body, too small).

    Attributes:
        assessment: the :class:`deploy.plausibility.Assessment` that refused it (findings and statistics).
    """

    def __init__(self, message: str, assessment: Any = None):
        super().__init__(message)
        self.assessment = assessment


class ImplausibleInputWarning(UserWarning):
    """A volume was segmented although it looks unusual (small field of view, oblique, forced past a refusal)."""


class RuntimeChoiceError(DeployError):
    """A runtime/precision this bundle or this machine cannot provide."""
