"""The product's main command: ``python distill/run.py [--config configs/demo.yaml] [--out DIR] [key=value ...]``.

A thin entry: the command is ``commands/run.py``, the stages it runs are ``pipeline/pipeline.py``.
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, sys.path[0] is distill/; the repository root must be importable too.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from commands.run import main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":
    main(sys.argv[1:])
