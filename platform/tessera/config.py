"""Typed configuration: pydantic models loaded from YAML with environment overrides.

Every job and app has one config model (a subclass of :class:`TesseraConfig`). A config file is
YAML; environment variables override single keys with ``TESSERA__`` followed by the dotted path
spelled with double underscores, e.g. ``TESSERA__STORAGE__ENDPOINT_URL=http://127.0.0.1:8333``.
Override values are parsed as YAML scalars (``8`` is an int, ``true`` a bool, ``[1, 2]`` a list).

An unknown key or a wrong type fails at load time with a :class:`ConfigError` naming the key and the
file (or the environment variable) it came from::

    cfg = load_config(EmbedConfig, "configs/embed.yaml")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

ENV_PREFIX = "TESSERA__"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and its source."""


class TesseraConfig(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


C = TypeVar("C", bound=TesseraConfig)


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, tuple[list[str], Any]]:
    """Return ``{env_var: (key_path, value)}`` for every ``TESSERA__...`` variable."""
    environ = os.environ if environ is None else environ
    found: dict[str, tuple[list[str], Any]] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX:
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        found[name] = (path, value)
    return found


def _origin_of(loc: tuple, env: dict[str, tuple[list[str], Any]], source: str) -> str:
    key = tuple(str(p) for p in loc)
    for var, (path, _) in env.items():
        if tuple(path) == key[: len(path)]:
            return f"environment variable {var}"
    return source


def parse_config(model: type[C], data: Mapping[str, Any] | None, source: str = "<dict>",
                 environ: Mapping[str, str] | None = None) -> C:
    """Validate ``data`` (plus environment overrides) into ``model``.

    Raises:
        ConfigError: naming each bad key, what is wrong with it and where it came from.
    """
    tree: dict = dict(data or {})
    env = env_overrides(environ)
    for _, (path, value) in env.items():
        _set_path(tree, path, value)
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "<root>"
            origin = _origin_of(e["loc"], env, source)
            if e["type"] == "extra_forbidden":
                lines.append(f"unknown key '{key}' in {origin}")
            else:
                lines.append(f"key '{key}' in {origin}: {e['msg']} (got {e.get('input')!r})")
        raise ConfigError(f"invalid {model.__name__} config:\n  " + "\n  ".join(lines)) from None


def load_config(model: type[C], path: str | os.PathLike | None,
                environ: Mapping[str, str] | None = None) -> C:
    """Load ``model`` from a YAML file (or defaults when ``path`` is None) plus env overrides."""
    if path is None:
        return parse_config(model, {}, "<defaults>", environ)
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {p}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {p} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level, not {type(data).__name__}")
    return parse_config(model, data, f"file {p}", environ)


def apply_flags(cfg: C, flags: list[tuple[str, str, Any]]) -> C:
    """Set ``cfg.<key> = value`` for each ``(flag, key, value)`` whose value is not None (command-line
    overrides); a value the model refuses raises a :class:`ConfigError` naming the flag."""
    for flag, key, value in flags:
        if value is None:
            continue
        try:
            setattr(cfg, key, value)
        except ValidationError as err:
            msg = err.errors()[0]["msg"] if err.errors() else str(err)
            raise ConfigError(f"{flag} {value!r} (config key '{key}'): {msg}") from None
    return cfg
