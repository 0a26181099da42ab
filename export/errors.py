"""Export errors: ``ValueError`` subclasses whose message names the file or the setting."""
from __future__ import annotations


class ExportError(ValueError):
    """An export that cannot be done as asked (bad checkpoint, data, or a model that fails its checks)."""
