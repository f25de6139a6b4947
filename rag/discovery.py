"""Which files an indexing run reads: walk the given files and folders, apply include/exclude
globs, and refuse anything that is not a regular file inside the indexed folder.

Symlinks are followed only when they resolve inside the indexed folder; loops and links that
escape it are reported as failed, never read. Devices, pipes and sockets (reading a FIFO would
block forever, ``/dev/zero`` never ends) are reported as failed too; the reader checks again on
the open file (:func:`rag.ingest.read_regular_file`), so a file swapped after the walk is caught.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from rag.documents import SUPPORTED_SUFFIXES


@dataclass
class Candidate:
    path: Path  # absolute path on disk
    source: str  # path within the collection
    root: str  # the indexed folder (real path)


def matches(rel: str, patterns: list[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in patterns)


def selected(rel: str, include: list[str] | None, exclude: list[str] | None) -> bool:
    return (not include or matches(rel, include)) and not (exclude and matches(rel, exclude))


def discover(paths: Iterable[str | os.PathLike], include: list[str] | None = None,
             exclude: list[str] | None = None) -> tuple[list[Candidate], list[dict[str, str]], int, list[str]]:
    """Files to index under ``paths`` -> (candidates, failed, skipped count, folder roots walked)."""
    include, exclude = include or [], exclude or []
    candidates: list[Candidate] = []
    failed: list[dict[str, str]] = []
    roots: list[str] = []
    skipped = 0
    for given in paths:
        given_path = Path(given).expanduser()
        try:
            real = given_path.resolve(strict=True)
            mode = real.stat().st_mode
        except FileNotFoundError:
            failed.append({"path": shown(str(given)), "error": "no such file or folder"})
            continue
        except (RuntimeError, OSError) as exc:
            failed.append({"path": shown(str(given)), "error": f"cannot resolve ({loop_or(exc)})"})
            continue
        if not utf8(str(real)):
            failed.append({"path": shown(str(given)), "error": "the path is not valid UTF-8; rename it (e.g. convmv -f latin1 -t utf8)"})
            continue
        if stat.S_ISREG(mode):
            if real.suffix.lower() not in SUPPORTED_SUFFIXES:
                failed.append({"path": str(given), "error": f"unsupported file type {real.suffix or '(none)'}; "
                               f"supported: {', '.join(SUPPORTED_SUFFIXES)}"})
                continue
            candidates.append(Candidate(real, given_path.name, str(real.parent)))
            continue
        if not stat.S_ISDIR(mode):
            failed.append({"path": str(given), "error": f"not a regular file or folder ({kind_of(mode)}); "
                           "give a document file or a folder of documents"})
            continue
        root = str(real)
        roots.append(root)
        walk_errors: list[OSError] = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=walk_errors.append):
            dirnames.sort()
            for d in list(dirnames):
                full = os.path.join(dirpath, d)
                if d.startswith("."):
                    dirnames.remove(d)
                elif os.path.islink(full):
                    dirnames.remove(d)  # never walk through directory links (loops, escapes)
                    problem = link_problem(full, root)
                    if problem:
                        failed.append({"path": shown(os.path.relpath(full, root)), "error": problem})
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                full = os.path.join(dirpath, name)
                rel = Path(os.path.relpath(full, root)).as_posix()
                if not utf8(rel):  # bytes that are not UTF-8 in a file name: SQLite and JSON cannot hold it
                    failed.append({"path": shown(rel), "error": "file name is not valid UTF-8; rename it (e.g. convmv -f latin1 -t utf8)"})
                    continue
                if not selected(rel, include, exclude):
                    continue
                if Path(name).suffix.lower() not in SUPPORTED_SUFFIXES:
                    skipped += 1
                    continue
                if os.path.islink(full):
                    problem = link_problem(full, root)
                    if problem:
                        failed.append({"path": rel, "error": problem})
                        continue
                try:
                    mode = os.stat(full).st_mode
                except OSError as exc:
                    failed.append({"path": rel, "error": f"cannot read ({exc.strerror or exc})"})
                    continue
                if not stat.S_ISREG(mode):
                    failed.append({"path": rel, "error": f"not a regular file ({kind_of(mode)}); only plain files are read"})
                    continue
                candidates.append(Candidate(Path(full), rel, root))
        for exc in walk_errors:
            where = os.path.relpath(exc.filename, root) if exc.filename else str(given)
            failed.append({"path": shown(where), "error": f"cannot list folder ({exc.strerror or exc}); check permissions"})
    return candidates, failed, skipped, roots


def utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def shown(text: str) -> str:
    """``text`` with undecodable bytes as ``\\xff`` escapes, so a report can always be printed and stored."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a plain file"


def loop_or(exc: BaseException) -> str:
    if isinstance(exc, RuntimeError) or getattr(exc, "errno", None) == errno.ELOOP:
        return "symlink loop"
    return str(exc)


def link_problem(link: str, root: str) -> str | None:
    try:
        target = Path(link).resolve(strict=True)
    except (RuntimeError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            return "broken symlink (its target does not exist)"
        return "symlink loop; remove or fix the link"
    if os.path.commonpath([str(target), root]) != root:
        return f"path escapes the indexed root (symlink to {target}); index that folder itself instead"
    return None
