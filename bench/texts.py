"""Real text for benchmarks: grocery product descriptions plus docstrings of the Python stdlib, then
of the installed packages (site-packages) when more are asked for (about 93k chunks in the stdlib).

Every string is real prose from this machine, cut into sentence-aligned chunks of about
``target_chars`` characters; nothing is generated or repeated (chunks are de-duplicated).
"""

from __future__ import annotations

import ast
import re
import sysconfig
from pathlib import Path

_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def _chunks(text: str, target_chars: int) -> list[str]:
    out, cur = [], ""
    for sentence in _SENTENCE.split(" ".join(text.split())):
        if cur and len(cur) + len(sentence) > target_chars:
            out.append(cur)
            cur = ""
        cur = f"{cur} {sentence}".strip()
    if len(cur) > target_chars // 3:
        out.append(cur)
    return out


def real_texts(shared_data: Path, n: int, target_chars: int = 240) -> list[str]:
    """Up to ``n`` distinct real texts (grocery descriptions, stdlib docstrings, then site-packages')."""
    seen: dict[str, None] = {}
    grocery = shared_data / "grocery" / "dataset" / "iconic-images-and-descriptions"
    for path in sorted(grocery.rglob("*.txt")):
        for c in _chunks(path.read_text(errors="replace"), target_chars):
            seen.setdefault(c)
    paths = sysconfig.get_paths()
    sources = [Path(paths["stdlib"]), Path(paths["purelib"])]
    files = (path for root in sources for path in sorted(root.rglob("*.py")))
    for path in files:
        if len(seen) >= n:
            break
        if "test" in path.parts or "idlelib" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    for c in _chunks(doc, target_chars):
                        seen.setdefault(c)
    return list(seen)[:n]
