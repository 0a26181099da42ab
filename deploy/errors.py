"""Errors of the edge runtime; all are ``ValueError`` subclasses whose message names the file."""
from __future__ import annotations


class DeployError(ValueError):
    """Base class of deploy errors."""


class BundleError(DeployError):
    """A deploy bundle that is missing, incomplete, tampered with or not understood."""


class InputVolumeError(DeployError):
    """An input volume that cannot be segmented (not 3D, empty, non-finite, unreadable)."""


class RuntimeChoiceError(DeployError):
    """A runtime/precision this bundle or this machine cannot provide."""
