"""Where the embedded stack keeps its state, and the shell environment file it writes."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

HOME_ENV = "TESSERA_HOME"


def state_dir() -> Path:
    """The state folder: ``$TESSERA_HOME`` or ``./.tessera`` (git-ignored)."""
    return Path(os.environ.get(HOME_ENV) or Path.cwd() / ".tessera").resolve()


def write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only (mode 0600, from its creation on), whole or not at all:
    the text goes to a temporary file beside it, renamed over it (a crash mid-write left a truncated
    credentials file that every later start failed to parse)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def env_file(home: Path | None = None) -> Path:
    return (home or state_dir()) / "env.sh"


def update_env_file(values: dict[str, str], home: Path | None = None) -> Path:
    """Merge ``values`` into ``env.sh`` (``export K=V`` lines, mode 0600) and return its path."""
    path = env_file(home)
    current = read_env_file(home)
    current.update(values)
    lines = [f"export {k}={shlex.quote(v)}" for k, v in sorted(current.items())]
    write_private(path, "# written by tessera; source it: . .tessera/env.sh\n" + "\n".join(lines) + "\n")
    return path


def read_env_file(home: Path | None = None) -> dict[str, str]:
    path = env_file(home)
    out: dict[str, str] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        if line.startswith("export ") and "=" in line:
            key, _, raw = line[len("export "):].partition("=")
            parts = shlex.split(raw)
            out[key] = parts[0] if parts else ""
    return out
