"""A Windows machine's file system, as far as its scripts and uploads reach it: case-insensitive paths, folders
that must exist before a file goes in them, and the environment variables paths are written with."""

from __future__ import annotations

import re
import threading

SYSTEM_ROOT = "C:\\Windows"
# What a path may start with instead of a drive, in cmd.exe's and PowerShell's spelling.
_VARIABLES = {
    "systemroot": SYSTEM_ROOT,
    "windir": SYSTEM_ROOT,
    "temp": SYSTEM_ROOT + "\\Temp",
    "tmp": SYSTEM_ROOT + "\\Temp",
}


class FileError(Exception):
    """What Windows says when a file operation is refused."""


def expand(path: str) -> str:
    """``$Env:SystemRoot\\x`` and ``%SYSTEMROOT%\\x`` as the path they stand for."""
    path = path.strip().strip("\"'")
    path = re.sub(r"(?i)\$env:(\w+)", lambda m: _VARIABLES.get(m.group(1).lower(), m.group(0)), path)
    path = re.sub(r"%(\w+)%", lambda m: _VARIABLES.get(m.group(1).lower(), m.group(0)), path)
    return path.replace("/", "\\")


def key(path: str) -> str:
    return expand(path).rstrip("\\").lower()


def parent(path: str) -> str:
    return key(path).rsplit("\\", 1)[0] if "\\" in key(path) else ""


class Files:
    """Files and folders by case-insensitive path; thread-safe, as the machine's processes run side by side."""

    def __init__(self, folders: list[str]) -> None:
        self._lock = threading.RLock()
        self._files: dict[str, bytearray] = {}
        self._folders: set[str] = set()
        for folder in folders:
            self.make_folder(folder)

    def is_folder(self, path: str) -> bool:
        return key(path) in self._folders

    def is_file(self, path: str) -> bool:
        return key(path) in self._files

    def exists(self, path: str) -> bool:
        return self.is_file(path) or self.is_folder(path)

    def make_folder(self, path: str) -> None:
        """Make a folder and its parents (as ``mkdir`` and ``New-Item -ItemType Directory`` do)."""
        with self._lock:
            parts = key(path).split("\\")
            for end in range(1, len(parts) + 1):
                folder = "\\".join(parts[:end])
                if folder in self._files:
                    raise FileError(f"An item with the specified name {folder} already exists.")
                self._folders.add(folder)

    def write(self, path: str, data: bytes) -> None:
        with self._lock:
            self._check_parent(path)
            if self.is_folder(path):
                raise FileError(f"Access to the path '{expand(path)}' is denied.")
            self._files[key(path)] = bytearray(data)

    def append(self, path: str, data: bytes) -> None:
        with self._lock:
            self._check_parent(path)
            self._files.setdefault(key(path), bytearray()).extend(data)

    def read(self, path: str) -> bytes:
        with self._lock:
            try:
                return bytes(self._files[key(path)])
            except KeyError:
                raise FileError(f"Cannot find path '{expand(path)}' because it does not exist.") from None

    def read_text(self, path: str) -> str:
        """A text file as Windows tools write them: UTF-16 with its byte order mark, or UTF-8 (with or without)."""
        data = self.read(path)
        if data.startswith(b"\xff\xfe"):
            return data[2:].decode("utf-16-le")
        return data.decode("utf-8-sig", errors="replace")

    def size(self, path: str) -> int:
        return len(self.read(path))

    def remove(self, path: str, *, recurse: bool = False) -> None:
        with self._lock:
            name = key(path)
            if name in self._files:
                del self._files[name]
                return
            if name not in self._folders:
                raise FileError(f"Cannot find path '{expand(path)}' because it does not exist.")
            inside = [p for p in [*self._files, *self._folders] if p.startswith(name + "\\")]
            if inside and not recurse:
                raise FileError(f"The item at {expand(path)} has children and the Recurse parameter was not specified.")
            for item in inside:
                self._files.pop(item, None)
                self._folders.discard(item)
            self._folders.discard(name)

    def move(self, source: str, destination: str) -> None:
        """Rename a file or folder; refused when the destination exists (what makes a rename a claim)."""
        with self._lock:
            old, new = key(source), key(destination)
            if self.exists(new):
                raise FileError(
                    f"Cannot create '{expand(destination)}' because a file or directory with the same name already exists."
                )
            self._check_parent(destination)
            if old in self._files:
                self._files[new] = self._files.pop(old)
                return
            if old not in self._folders:
                raise FileError(f"Cannot find path '{expand(source)}' because it does not exist.")
            for item in [p for p in self._files if p.startswith(old + "\\")]:
                self._files[new + item[len(old) :]] = self._files.pop(item)
            for item in [p for p in self._folders if p == old or p.startswith(old + "\\")]:
                self._folders.discard(item)
                self._folders.add(new + item[len(old) :])

    def _check_parent(self, path: str) -> None:
        folder = parent(path)
        if folder and folder not in self._folders:
            raise FileError(f"Could not find a part of the path '{expand(path)}'.")
