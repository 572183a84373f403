"""Atomic file writes: every file this program leaves behind is whole or absent."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable


def write_atomic(path: str | os.PathLike, write: Callable[[Any], Any]) -> None:
    """Call write(binary file) on a temporary file beside `path`, then rename it over `path`.

    Readers never see half a file, and a failed write leaves no temporary file behind.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    write_atomic(path, lambda f: f.write(text.encode()))


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write indented JSON atomically."""
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def write_folder_atomic(path: str | os.PathLike, build: Callable[[Path], Any]) -> None:
    """Call build(folder) on a temporary folder beside `path`, then rename it to `path` (which must not exist).

    Readers never see a half-built folder, and a failed build leaves nothing behind.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed earlier attempt
    try:
        tmp.mkdir(parents=True)
        build(tmp)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_folder_atomic(path: str | os.PathLike, build: Callable[[Path], Any]) -> None:
    """Like write_folder_atomic, but an existing folder at `path` is replaced once the new one is complete."""
    target = Path(path)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        write_folder_atomic(target, build)
        return
    fresh = target.with_name(f".{target.name}.new")
    shutil.rmtree(fresh, ignore_errors=True)
    write_folder_atomic(fresh, build)
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(target, old)
    os.rename(fresh, target)
    shutil.rmtree(old)
