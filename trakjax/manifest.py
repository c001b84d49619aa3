"""The manifest of trakjax's own files: what an overwrite may remove, and nothing else.

A store directory and a command-line output directory hold only names trakjax creates, listed
here as patterns relative to the directory (``*`` matches one path component, ``**/`` any
number of leading folders; a pattern ending in ``/`` is a folder). An overwrite removes the
files that match and the folders they leave empty; when it finds anything else (a user's file,
a link, a folder trakjax does not make), it refuses and lists them, removing nothing
(:func:`remove_own_files`). Links are never followed: a link is never trakjax's, and a root
that is a link is refused.

To make trakjax own more names (the explorer's ``index.html`` and its content-hashed assets,
say), register them once, at import of the module that writes them::

    manifest.register(manifest.OUTPUT, "index.html", "assets/", "assets/*.js", "assets/*.css")
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

from trakjax.errors import StoreError

STORE = "store"
"""The manifest of a store directory (:mod:`trakjax.store`)."""
OUTPUT = "output"
"""The manifest of a ``trakjax attribute`` output directory (:mod:`trakjax.inputs`)."""
TEMPORARY = "**/.*.tmp.*"
"""Temporary files of :mod:`trakjax.files` (``.<name>.tmp.<host>.<pid>.<id>``), in any folder."""

_PATTERNS: dict[str, list[str]] = {
    STORE: [
        "trakjax_store.json", ".lock", TEMPORARY,
        "models/", "models/*/", "models/*/.lock", "models/*/model.json", "models/*/grads.npy",
        "models/*/out_to_loss.npy", "models/*/done.npy", "models/*/output_shift.npy",
        "models/*/curvature.npy", "models/*/features.npy",
        "experiments/", "experiments/*/", "experiments/*/experiment.json", "experiments/*/scores.npy",
        "experiments/*/targets/", "experiments/*/targets/*/", "experiments/*/targets/*/grads.npy",
        "experiments/*/targets/*/done.npy", "experiments/*/partial/", "experiments/*/partial/*/",
        "experiments/*/partial/*/scores.npy", "experiments/*/partial/*/scores_done.npy",
    ],
    OUTPUT: ["run.json", "topk.csv", "topk.json", "attributions.png", TEMPORARY],
}
"""The explorer's page and assets join OUTPUT when :mod:`trakjax.explorer` is imported (its
``OWNED_PATTERNS``)."""
_NESTED: dict[str, dict[str, str]] = {OUTPUT: {"store/": STORE}}
"""Folders of a directory that hold another manifest's directory (the output's store)."""


def register(kind: str, *patterns: str) -> None:
    """Add name ``patterns`` to the manifest ``kind`` (:data:`STORE` or :data:`OUTPUT`)."""
    if kind not in _PATTERNS:
        raise ValueError(f"manifest kind must be one of {sorted(_PATTERNS)}, got {kind!r}")
    for pattern in patterns:
        if pattern not in _PATTERNS[kind]:
            _PATTERNS[kind].append(pattern)


def patterns(kind: str) -> tuple[str, ...]:
    """The name patterns of manifest ``kind``."""
    return tuple(_PATTERNS[kind]) + tuple(_NESTED.get(kind, {}))


def _matches(relative: str, pattern: str) -> bool:
    if pattern.startswith("**/"):
        return fnmatch.fnmatchcase(relative.rsplit("/", 1)[-1], pattern[3:])
    parts, wanted = relative.split("/"), pattern.split("/")
    return len(parts) == len(wanted) and all(
        fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted, strict=True))


def is_own(kind: str, relative: str, is_folder: bool) -> bool:
    """Whether the path ``relative`` (posix, relative to the directory) is one trakjax creates."""
    name = relative + "/" if is_folder else relative
    return any(_matches(name.rstrip("/"), p.rstrip("/")) and p.endswith("/") == is_folder
               for p in _PATTERNS[kind])


def check_not_link(path: Path, what: str) -> None:
    """Refuse a directory that is a symbolic link (trakjax never follows one to remove files)."""
    if Path(path).is_symlink():
        raise StoreError(
            f"{what} {path} is a symbolic link (to {os.readlink(path)}); trakjax does not follow "
            "links to replace or remove files: name the directory itself"
        )


def survey(root: Path, kind: str) -> tuple[list[Path], list[Path]]:
    """``(trakjax's files and folders, everything else)`` under ``root``, links never followed.

    A link or anything not a regular file or folder counts as foreign; a foreign folder is
    listed once, without its contents.
    """
    root = Path(root)
    own: list[Path] = []
    foreign: list[Path] = []
    nested = _NESTED.get(kind, {})

    def visit(folder: Path, prefix: str) -> None:
        with os.scandir(folder) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                relative = prefix + entry.name
                path = Path(entry.path)
                is_folder = entry.is_dir(follow_symlinks=False)
                if entry.is_symlink() or not (is_folder or entry.is_file(follow_symlinks=False)):
                    foreign.append(path)
                elif is_folder and relative + "/" in nested:
                    inner_own, inner_foreign = survey(path, nested[relative + "/"])
                    own.extend(inner_own + [path])
                    foreign.extend(inner_foreign)
                elif is_own(kind, relative, is_folder):
                    if is_folder:
                        visit(path, relative + "/")
                    own.append(path)
                else:
                    foreign.append(path)

    if root.is_dir():
        visit(root, "")
    return own, foreign


def remove_own_files(root: Path, kind: str, *, what: str, keep: tuple[str, ...] = (),
                     within: tuple[str, ...] | None = None) -> None:
    """Remove trakjax's files under ``root`` (manifest ``kind``), refusing if there are others.

    Args:
      root: the directory (not a link).
      kind: :data:`STORE` or :data:`OUTPUT`.
      what: how messages name the directory (``"the store"``).
      keep: relative names to leave in place (e.g. the store's metadata and lock).
      within: only look at these top-level entries (e.g. ``("models", "experiments")``).

    Raises:
      StoreError: ``root`` is a link, or holds files trakjax did not create (listed, up to 20);
        nothing is removed then.
    """
    root = Path(root)
    check_not_link(root, what)
    own, foreign = survey(root, kind)
    if within is not None:
        inside = {root / name for name in within}
        own = [p for p in own if any(p == top or top in p.parents for top in inside)]
        foreign = [p for p in foreign if any(p == top or top in p.parents for top in inside)]
    if foreign:
        listed = ", ".join(str(p) for p in foreign[:20]) + (f" … {len(foreign) - 20} more" if len(foreign) > 20 else "")
        raise StoreError(
            f"{what} {root} holds files trakjax did not create: {listed}; nothing was removed. "
            "Move them elsewhere, or use another directory"
        )
    kept = {root / name for name in keep}
    for path in own:  # children come before their folders
        if path in kept:
            continue
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink()
