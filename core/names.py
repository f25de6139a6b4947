"""The one rule for names a user gives (collection, adapter, run, A/B run, upload) and the one
function that turns such a name into a path.

A name is a plain name: letters, digits, ``_``, ``.`` and ``-``, starting with a letter or digit, at
most 64 characters, never ``.``/``..``-like and never containing a path separator. ``child_path``
refuses anything else and anything that would resolve outside its folder (a symlink planted in the
folder included), so no caller can build a path from a user's string by hand.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class InvalidName(ValueError):
    """A user-given name that cannot become a path; the message names the input and the fix."""


def check_name(name: object, kind: str = "name") -> str:
    """Return ``name`` if it is a plain name, else raise ``InvalidName`` saying what is allowed."""
    if not isinstance(name, str):
        raise InvalidName(f"{kind} must be a string, got {type(name).__name__}")
    if not NAME_RE.fullmatch(name) or ".." in name:
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise InvalidName(
            f"invalid {kind} {shown!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or "
            f"digit, with no '/' and no '..' (for example 'corvida-raft')")
    return name


def child_path(root: str | os.PathLike, name: object, kind: str = "name") -> Path:
    """The path of ``name`` directly inside ``root``; refuses any name that is not plain or that would
    resolve outside ``root`` (for example through a symlink someone planted there)."""
    check_name(name, kind)
    root_path = Path(root)
    path = root_path / str(name)
    resolved_root = root_path.resolve()
    resolved = path.resolve()
    if resolved.parent != resolved_root:
        # the message names no absolute path: it may reach an HTTP client
        raise InvalidName(f"{kind} {name!r} resolves outside its folder (a symlink?); remove the link or pick another name")
    return path


def within_roots(path: str | os.PathLike, roots: list[str | os.PathLike] | tuple, kind: str = "path") -> Path:
    """Resolve ``path`` and return it if it lies inside one of ``roots`` (after resolving symlinks);
    otherwise raise ``InvalidName`` listing the allowed roots and how to add one."""
    resolved = Path(path).expanduser().resolve()
    allowed = [Path(r).expanduser().resolve() for r in roots]
    for root in allowed:
        if resolved == root or resolved.is_relative_to(root):
            return resolved
    listed = ", ".join(str(r) for r in allowed) or "(none configured)"
    raise InvalidName(f"{kind} {str(path)!r} is outside the allowed folders ({listed}); move the files there "
                      f"or add the folder to the allowed roots in the workspace config")
