"""Does a trained teacher fit this run's data? One comparison, used wherever a ``teacher.pt`` made elsewhere
is about to teach (``--teacher`` / ``teacher.checkpoint_file``, the teacher cache, online distillation).

A ``teacher.pt`` records what it was trained on (docs/interfaces.md): ``labels`` ``{id: name}``,
``num_classes``, the preprocessing spec ``preprocess`` and its window ``roi_size``. A teacher whose class ids
mean other organs than the run's labels would teach the students the wrong organ under every id, so:

- labels (every id and its name) and the class count must match; no setting overrides that;
- the ROI must match the run's ``teacher.roi_size`` (the teacher's depth embedding and the cache's windows
  are sized by it; set ``teacher.roi_size`` to the checkpoint's value);
- the preprocessing spec (spacing, orientation, intensity mode, window, statistics) must match; only this
  may be overridden, with ``teacher.allow_preprocess_mismatch: true``, and then every difference is warned
  about (:class:`TeacherPreprocessWarning`): the teacher sees inputs unlike the ones it was trained on.

A mismatch raises :class:`TeacherMismatchError` naming the checkpoint, each field, the teacher's value and
the run's.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

MISSING = "<missing>"
OVERRIDE_KEY = "teacher.allow_preprocess_mismatch"


class TeacherMismatchError(ValueError):
    """A teacher checkpoint that does not fit the run's data; the message names the file and every field."""


class TeacherPreprocessWarning(UserWarning):
    """A preprocessing mismatch let through by ``teacher.allow_preprocess_mismatch``."""


def check_teacher_fits(
    meta: Mapping[str, Any],
    labels: Mapping[Any, str],
    preprocess: Mapping[str, Any],
    roi_size: Sequence[int] | None = None,
    allow_preprocess_mismatch: bool = False,
    source: str | Path = "teacher.pt",
) -> list[str]:
    """Refuse a teacher whose labels, class count, ROI or preprocessing differ from the run's.

    Args:
        meta: the checkpoint's keys (``teacher.load_teacher``'s second value): ``labels``, ``num_classes``,
            ``preprocess``, ``roi_size``.
        labels: the run's ``{class id: name}`` including ``0: "background"`` (``data.labels``).
        preprocess: the run's preprocessing spec (``data.preprocess``).
        roi_size: the run's ``teacher.roi_size``; None: not compared.
        allow_preprocess_mismatch: let a preprocessing-only mismatch through, with a warning.
        source: the checkpoint file, for messages.

    Returns:
        The preprocessing differences that were allowed (one line each; empty when everything matches).

    Raises:
        TeacherMismatchError: a label, class-count or ROI mismatch (always), or a preprocessing mismatch
            without ``allow_preprocess_mismatch``.
        ValueError: ``allow_preprocess_mismatch`` is not a boolean.
    """
    if not isinstance(allow_preprocess_mismatch, bool):
        raise ValueError(f"{OVERRIDE_KEY} must be true or false, got {allow_preprocess_mismatch!r}")
    hard = _label_problems(meta, labels)
    if roi_size is not None:
        theirs = meta.get("roi_size", MISSING)
        ours = [int(s) for s in roi_size]
        if theirs is MISSING or _as_int_list(theirs) != ours:
            hard.append(f"roi_size: teacher {_show(theirs)}, run (teacher.roi_size) {ours} "
                        f"(set teacher.roi_size={_show(theirs)} to use this teacher)")
    soft = [f"preprocess.{path}: teacher {_show(t)}, run (data.preprocess) {_show(r)}"
            for path, t, r in _differences(meta.get("preprocess", MISSING), dict(preprocess))]

    head = f"{source}: the teacher does not fit this run's data (teacher = the checkpoint's value, run = this run's)"
    if hard:
        lines = hard + soft
        tail = ("labels, class count and ROI must match; no setting overrides them"
                + (f" ({OVERRIDE_KEY} covers the preprocessing lines only)" if soft else ""))
        raise TeacherMismatchError("\n  - ".join([head, *lines]) + f"\n  {tail}")
    if soft and not allow_preprocess_mismatch:
        raise TeacherMismatchError("\n  - ".join([head, *soft]) + (
            f"\n  a preprocessing-only mismatch can be allowed with {OVERRIDE_KEY}=true (the teacher then sees "
            "inputs unlike those it was trained on)"))
    if soft:
        warnings.warn("\n  - ".join([f"{source}: {OVERRIDE_KEY}=true: this teacher was trained with another "
                                     "preprocessing than this run's; it teaches anyway", *soft]),
                      TeacherPreprocessWarning, stacklevel=2)
    return soft


def _label_problems(meta: Mapping[str, Any], labels: Mapping[Any, str]) -> list[str]:
    """Differences of class ids, names and count; an unreadable or absent ``labels`` is one."""
    ours = {int(k): str(v) for k, v in labels.items()}
    expected_classes = max(ours) + 1 if ours else 0
    problems = []
    theirs_raw = meta.get("labels")
    if not isinstance(theirs_raw, Mapping):
        problems.append(f"labels: teacher {_show(MISSING if theirs_raw is None else theirs_raw)} (its classes cannot "
                        f"be checked), run (data.labels) {ours}")
    else:
        try:
            theirs = {int(k): str(v) for k, v in theirs_raw.items()}
        except (TypeError, ValueError):
            theirs = None
            problems.append(f"labels: teacher {theirs_raw!r} is not an {{id: name}} mapping, run (data.labels) {ours}")
        if theirs is not None and theirs != ours:
            for cid in sorted(set(theirs) | set(ours)):
                if theirs.get(cid) != ours.get(cid):
                    problems.append(f"labels[{cid}]: teacher {_show(theirs.get(cid, MISSING))}, "
                                    f"run (data.labels) {_show(ours.get(cid, MISSING))}")
            if sorted(theirs.values()) == sorted(ours.values()):
                problems.append(f"labels: the same names in another order (teacher {theirs}, run {ours}): "
                                "its class ids mean other organs than the run's")
    num = meta.get("num_classes", MISSING)
    try:
        same = num is not MISSING and int(num) == expected_classes
    except (TypeError, ValueError):
        same = False
    if not same:
        problems.append(f"num_classes: teacher {_show(num)}, run (data.labels) {expected_classes}")
    return problems


def _differences(teacher: Any, run: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """``(dotted path, teacher value, run value)`` for every leaf that differs; lists compare as a whole."""
    if isinstance(teacher, Mapping) and isinstance(run, Mapping):
        for key in sorted(set(teacher) | set(run), key=str):
            yield from _differences(teacher.get(key, MISSING), run.get(key, MISSING), f"{path}.{key}" if path else str(key))
    elif not _same(teacher, run):
        yield (path or "(spec)"), teacher, run


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if _number(a) and _number(b):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return not any(True for _ in _differences(a, b))
    if _number(a) or _number(b):
        return False  # one number, one not (e.g. a statistic against None)
    return type(a) is type(b) and a == b


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _as_int_list(x: Any) -> list[int] | None:
    try:
        return [int(s) for s in x]
    except (TypeError, ValueError):
        return None


def _show(x: Any) -> str:
    if x is MISSING:
        return MISSING
    if isinstance(x, tuple):
        x = list(x)
    return repr(x)
