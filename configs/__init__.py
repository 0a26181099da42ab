"""Run configuration: one nested mapping per run, loaded from YAML, overridden by ``key=value`` pairs.

A config is plain data (dicts, lists, numbers, strings) so that it can be logged verbatim to MLflow and
hashed to key cached artifacts. Overrides use dotted paths and YAML scalars::

    cfg = load_config("configs/demo.yaml", ["teacher.steps=200", "distill.lambda_kd=0.5"])
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

CONFIG_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file or key."""


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
        strict: refuse keys that do not already exist (catches typos such as ``techer.lr``).
    """
    out = copy.deepcopy(cfg)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            if part not in node:
                if strict:
                    raise ConfigError(f"override {text!r}: unknown key {'.'.join(path[: i + 1])!r}")
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"override {text!r}: {'.'.join(path[: i + 1])!r} is not a section")
            node = node[part]
        if strict and path[-1] not in node:
            raise ConfigError(f"override {text!r}: unknown key {'.'.join(path)!r}")
        node[path[-1]] = value
    return out


def load_config(path: str | Path, overrides: Iterable[str] = (), strict: bool = True) -> dict:
    """Load a YAML config (a path or a preset name) and apply overrides.

    A config may name a ``base:`` preset; its keys are merged underneath.
    """
    p = resolve_config_path(path)
    try:
        cfg = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from exc
    if not isinstance(cfg, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(cfg).__name__}")
    base = cfg.pop("base", None)
    if base:
        cfg = merge(load_config(base), cfg)
    return apply_overrides(cfg, overrides, strict=strict)


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
