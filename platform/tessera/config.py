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

import copy
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
        found[name] = (path, env_value(raw))
    return found


def env_value(raw: str) -> Any:
    """An override's value: a YAML list or mapping (``[10, 20]``), ``null``, or a quoted string (its
    content) are parsed; any other value is its text, stripped, which the model converts to the key's type
    (``64`` to an int key, ``false`` to a bool): so ``TESSERA__RUN_ID=20241205`` or ``=0123`` is that
    text, where YAML 1.1 would read the numbers 20241205 and 83, and a value holding `` #`` is not cut at
    a YAML comment."""
    text = raw.strip()
    if not text:
        return raw
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if value is None or isinstance(value, (list, dict)) or (isinstance(value, str) and text[0] in "'\""):
        return value
    return text


def _origin_of(loc: tuple, env: dict[str, tuple[list[str], Any]], source: str, data: Mapping[str, Any]) -> str:
    """Where the value at ``loc`` came from: an environment variable setting it or a key above it; one
    setting a key beneath it, unless the file holds ``loc`` too (then both are named); else the file."""
    key = tuple(str(p) for p in loc)
    for var, (path, _) in env.items():
        if tuple(path) == key[: len(path)]:
            return f"environment variable {var}"
    below = [var for var, (path, _) in env.items() if len(path) > len(key) and tuple(path[: len(key)]) == key]
    if key and below:  # (an error of the whole config is every override's "above": none is named)
        node: Any = data
        for part in key:
            node = node.get(part) if isinstance(node, Mapping) else None
        return f"environment variable {below[0]}" if node is None else \
            f"{source} (with environment variable {below[0]})"
    return source


def parse_config(model: type[C], data: Mapping[str, Any] | None, source: str = "<dict>",
                 environ: Mapping[str, str] | None = None) -> C:
    """Validate ``data`` (plus environment overrides) into ``model``.

    Raises:
        ConfigError: naming each bad key, what is wrong with it and where it came from.
    """
    tree: dict = copy.deepcopy(dict(data or {}))  # the overrides go into nested sections: not the caller's
    env = env_overrides(environ)
    for _, (path, value) in env.items():
        _set_path(tree, path, value)
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "<root>"
            origin = _origin_of(e["loc"], env, source, data or {})
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
