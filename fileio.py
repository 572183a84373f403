"""Files this program reads and writes: written atomically (whole or absent), read with one-line errors."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from errors import UserError


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


def write_yaml_atomic(path: str | os.PathLike, mapping: dict) -> None:
    """Write a mapping as YAML atomically, keys in their order (loadable again with --config)."""
    import yaml  # here: main.py imports this module's users on every start-up

    write_text_atomic(path, yaml.safe_dump(mapping, sort_keys=False))


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


def check_writable(flag: str, path: str) -> None:
    """Fail now, in one line, if `path` cannot receive a file (rather than after minutes of work)."""
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{flag} {path} is a folder: give a file name")
    if not target.parent.is_dir():
        raise UserError(f"{flag} {path}: folder {target.parent} does not exist: create it or choose another path")
    if not os.access(target.parent, os.W_OK):
        raise UserError(f"{flag} {path}: folder {target.parent} is not writable: choose another path")


def write_output(path: str, flag: str, write: Callable[[Any], Any]) -> None:
    """Write an output file atomically; an unwritable path becomes a one-line error naming the flag."""
    try:
        write_atomic(path, write)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write ({e.strerror or e}): choose another path") from None


def read_mapping(path: Path, hint: str) -> dict:
    """The one mapping a .json or .yaml file holds; a missing, damaged or other file is a one-line error: `hint` says
    what to do."""
    import yaml  # here: main.py imports this module's users on every start-up

    # JSON by its own parser: PyYAML reads numbers such as 5e-05 (no decimal point) as strings.
    load = json.loads if path.suffix == ".json" else yaml.safe_load
    try:
        value = load(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        raise UserError(f"{path} is missing, unreadable or damaged ({type(err).__name__}): {hint}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} does not hold a mapping of keys to values: {hint}")
    return value


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
