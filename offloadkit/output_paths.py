"""Output paths of the command line, checked *before* the work that fills them.

A command that simulates, measures or writes a checkpoint for a minute and then cannot save the result
has lost that minute (and printed a traceback). Every ``--out``, ``--trace``, ``--html`` and
``--ptx-dir`` goes through here first:

- :func:`check_output_file`: ``results/step.json`` -> refused if it is a folder, if ``results/`` does not
  exist or is not a folder, or if the file (or, for a new file, its folder) is not writable.
- :func:`check_output_folder`: the same for a folder the command fills (created if missing, but only
  inside a folder that exists); with ``force=False`` an existing non-empty folder is refused.

It creates nothing and deletes nothing: a typo in a path must not leave folders behind, and only the
command that writes decides what it replaces. Permissions are read with ``os.access``, which a root
user passes everywhere except on a read-only file system.
"""

from __future__ import annotations

import os
from pathlib import Path

from offloadkit.errors import OffloadkitError


def _check_parent(p: Path, option: str, shown: str, *, creates: bool = True) -> None:
    """The folder ``p`` lies in exists and is a folder; if ``p`` is to be ``creates``-d there, it is writable."""
    parent = p.parent
    if not parent.exists():
        raise OffloadkitError(f"{option} {shown}: the folder {parent} does not exist; create it first "
                              f"or choose another path")
    if not parent.is_dir():
        raise OffloadkitError(f"{option} {shown}: {parent} is a file, not a folder")
    if creates and not os.access(parent, os.W_OK | os.X_OK):
        raise OffloadkitError(f"{option} {shown}: cannot write in the folder {parent} (permission denied)")


def check_output_file(path: str | os.PathLike[str], option: str) -> Path:
    """Refuse an output file that cannot be written (see the module docstring); return it as a Path.

    ``option`` names the flag in the message: ``check_output_file("/tmp", "--trace")`` raises
    "--trace /tmp: is a folder; give a file name inside it".
    """
    shown = os.fspath(path)
    p = Path(path).expanduser()
    if not shown:
        raise OffloadkitError(f"{option} needs a file name, got an empty string")
    if p.is_dir():
        raise OffloadkitError(f"{option} {shown}: is a folder; give a file name inside it")
    _check_parent(p, option, shown, creates=not p.exists())  # an existing file is rewritten in place
    if p.exists() and not os.access(p, os.W_OK):
        raise OffloadkitError(f"{option} {shown}: the file exists and is not writable (permission denied)")
    return p


def check_output_folder(path: str | os.PathLike[str], option: str, *, force: bool | None = None) -> Path:
    """Refuse an output folder that cannot be written; return it as a Path.

    ``force=False``: an existing folder with anything in it is refused ("... pass --force to overwrite");
    ``force=None``: writing into an existing folder is the command's normal use (e.g. ``--ptx-dir``).
    """
    shown = os.fspath(path)
    p = Path(path).expanduser()
    if not shown:
        raise OffloadkitError(f"{option} needs a folder name, got an empty string")
    if p.exists():
        if not p.is_dir():
            raise OffloadkitError(f"{option} {shown}: is a file, not a folder")
        if not os.access(p, os.W_OK | os.X_OK):
            raise OffloadkitError(f"{option} {shown}: cannot write in this folder (permission denied)")
        if force is False and any(p.iterdir()):
            raise OffloadkitError(f"{option} {shown}: the folder exists and is not empty; pass --force to "
                                  f"overwrite the files this command writes there")
        return p
    _check_parent(p, option, shown)
    return p


__all__ = ["check_output_file", "check_output_folder"]
