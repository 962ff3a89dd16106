"""Append-only JSONL files that survive a kill: the complete lines, a torn tail cut off."""

from __future__ import annotations

from pathlib import Path


def complete_lines(path: Path) -> tuple[list[bytes], int]:
    """The complete lines of ``path`` (without newlines) and how many bytes a torn last line had.

    A last line without its newline (the writer was killed mid-write) is cut off the file, so
    appending continues from a clean line boundary. A missing file has no lines.
    """
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    torn = len(data) - keep
    if torn:
        with open(path, "r+b") as f:
            f.truncate(keep)
    return data[:keep].split(b"\n")[:-1], torn
