"""Reading a user's file: any failure is one message naming the file and what is wrong.

Every text file fedlora reads (data, configs, site settings) goes through `read_text`, so a
file that is not UTF-8 names the line and byte, instead of a bare UnicodeDecodeError.
"""

from __future__ import annotations

from pathlib import Path

from fedlora.errors import FedloraError


def read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except IsADirectoryError:
        raise FedloraError(f"{what} {path} is a folder, not a file.") from None
    except OSError as exc:
        raise FedloraError(f"{what} {path} cannot be read ({exc.strerror}).") from None


def decode(data: bytes, path: Path, what: str) -> str:
    """`data` as UTF-8 (a byte-order mark is dropped); an error names line and byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise FedloraError(
            f"{what} {path}, line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at "
            f"offset {exc.start}); save the file as UTF-8."
        ) from None


def read_text(path: Path, what: str) -> str:
    return decode(read_bytes(path, what), path, what)
