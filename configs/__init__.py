"""Run configuration: one nested mapping per run, loaded from YAML, overridden by ``key=value`` pairs, and
resolved against the schema (``configs/schema.py``: one dataclass per section with its defaults).

A config is plain data (dicts, lists, numbers, strings) so that it can be logged verbatim to MLflow and
hashed to key cached artifacts. Overrides use dotted paths and YAML scalars::

    cfg = load_config("configs/demo.yaml", ["teacher.steps=200", "distill.lambda_kd=0.5"])

The result holds every key of the schema (missing ones at their default); an unknown key in the file, its
``base:`` preset or an override is refused with its dotted path and the nearest known name.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from configs.schema import ConfigError, check_path, resolve

CONFIG_DIR = Path(__file__).resolve().parent

__all__ = ["ConfigError", "apply_overrides", "config_hash", "flatten", "load_config", "merge", "parse_override",
           "resolve_config", "resolve_config_path"]


def resolve_config(cfg: Mapping[str, Any] | None) -> dict:
    """``cfg`` (whole or partial) checked against the schema, every missing key at its default
    (``configs.schema.resolve``)."""
    return resolve(cfg)


def resolve_config_path(path: str | Path) -> Path:
    """Find a config by path, or by preset name in ``configs/`` (``demo`` → ``configs/demo.yaml``)."""
    p = Path(path)
    if p.is_file():
        return p
    for candidate in (CONFIG_DIR / p.name, CONFIG_DIR / f"{p.name}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file not found: {path} (presets: {sorted(c.stem for c in CONFIG_DIR.glob('*.yaml'))})")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into a key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return key.split("."), value


def apply_overrides(cfg: dict, overrides: Iterable[str], strict: bool = True) -> dict:
    """Return a copy of ``cfg`` with dotted ``key=value`` overrides applied.

    Args:
        cfg: nested mapping.
        overrides: strings like ``"teacher.lr=3e-4"``.
        strict: refuse keys the schema does not know (catches typos such as ``techer.lr``, naming the nearest
            known key); a known key the config does not set yet is added.
    """
    out = copy.deepcopy(cfg)
    for text in overrides:
        path, value = parse_override(text)
        if strict:
            try:
                check_path(path)
            except ConfigError as exc:
                raise ConfigError(f"override {text!r}: {exc}") from None
        node = out
        for i, part in enumerate(path[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"override {text!r}: {'.'.join(path[: i + 1])!r} is not a section")
            node = node[part]
        node[path[-1]] = value
    return out


def load_config(path: str | Path, overrides: Iterable[str] = (), strict: bool = True) -> dict:
    """Load a YAML config (a path or a preset name), apply overrides and resolve it against the schema.

    A config may name a ``base:`` preset; its keys are merged underneath. Returns the resolved config: every key
    of ``configs.schema`` present, at its default where neither the files nor the overrides set it.
    """
    overrides = list(overrides)
    cfg = apply_overrides(_load_file(path), overrides, strict=strict)
    try:
        return resolve(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{resolve_config_path(path)} with overrides {list(overrides)}: {exc}") from None


def _load_file(path: str | Path) -> dict:
    """A config file merged over its ``base:`` presets, unresolved (so a top file's ``teacher.backbone`` still
    chooses the backbone's defaults); each file's keys are checked against the schema, naming the file."""
    p = resolve_config_path(path)
    try:
        cfg = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from exc
    if not isinstance(cfg, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(cfg).__name__}")
    base = cfg.pop("base", None)
    try:
        resolve(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    return merge(_load_file(base), cfg) if base else cfg


def merge(base: Mapping, top: Mapping) -> dict:
    """Recursively merge ``top`` over ``base`` (new dict)."""
    out = copy.deepcopy(dict(base))
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def config_hash(section: Any) -> str:
    """Stable short hash of any config section (keys sorted), used to key cached artifacts."""
    blob = json.dumps(section, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def flatten(cfg: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (for MLflow params)."""
    flat: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(flatten(v, key + "."))
        else:
            flat[key] = v
    return flat
