"""JSON Lines input/output with one-line errors, crash-safe appends and resumable runs.

* ``read_jsonl`` raises :class:`DataError` ``"file:line: what is wrong"`` for malformed JSON, a line that is not
  an object, or a missing required field. A pretty-printed file of concatenated JSON objects (the shape of the
  official raw example) is accepted too, so the official samples load as they are.
* ``append_jsonl`` writes one record per call and flushes it (optionally fsyncs), so a killed run loses at most the
  line it was writing.
* ``completed_ids`` / ``completed_records`` list the records already written; a torn last line (a run killed
  mid-write) is cut off first (``repair_tail``) so that a resumed run appends cleanly after the last complete one.
* ``write_jsonl_atomic`` writes to a temporary file in the same folder and renames it over the target.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..atomic import atomic_write_bytes
from ..errors import ReflectEvoError

__all__ = ["DataError", "read_jsonl", "iter_jsonl", "append_jsonl", "write_jsonl_atomic", "completed_ids",
           "completed_records", "repair_tail"]


class DataError(ReflectEvoError, ValueError):
    """Bad input data; the message is one line naming the file (and line) and what is wrong."""


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _iter_concatenated(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    """Objects of a file holding pretty-printed JSON objects one after another (line = where each starts)."""
    decoder = json.JSONDecoder()
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{text.count(chr(10), 0, e.pos) + 1}: malformed JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{line}: expected a JSON object, got {type(obj).__name__}")
        yield line, obj


def iter_jsonl(path: str | os.PathLike, required_fields: Iterable[str] = (),
               torn_tail_ok: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for each record; raise :class:`DataError` on the first bad line.
    ``torn_tail_ok``: a malformed last line without its newline (a writer killed mid-line, or one still writing)
    is left out with a note on stderr instead, and the file is not touched (``repair_tail`` is for writers)."""
    path = Path(path)
    required = tuple(required_fields)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (some Windows editors) is dropped
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({_one_line(e)})") from None
    stripped = text.lstrip()
    if stripped.startswith("{") and "\n" in stripped and stripped.split("\n", 1)[0].strip() == "{":
        records: Iterable[tuple[int, dict]] = _iter_concatenated(path, text)
    else:
        records = _iter_lines(path, text, torn_tail_ok)
    for line_no, obj in records:
        missing = [f for f in required if f not in obj]
        if missing:
            raise DataError(f"{path}:{line_no}: missing field {', '.join(repr(m) for m in missing)}")
        yield line_no, obj


def _iter_lines(path: Path, text: str, torn_tail_ok: bool = False) -> Iterator[tuple[int, dict]]:
    lines = text.splitlines()
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if torn_tail_ok and line_no == len(lines) and not text.endswith("\n"):
                print(f"{path}:{line_no}: incomplete last line (a run killed or still writing) left out",
                      file=sys.stderr, flush=True)
                return
            raise DataError(f"{path}:{line_no}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
        yield line_no, obj


def read_jsonl(path: str | os.PathLike, required_fields: Iterable[str] = ()) -> list[dict]:
    """All records of a JSONL file as dicts; one-line :class:`DataError` ``file:line: ...`` on bad input."""
    return [obj for _, obj in iter_jsonl(path, required_fields)]


def _dumps(record: Any) -> str:
    return json.dumps(record, ensure_ascii=False)


def append_jsonl(path: str | os.PathLike, record: dict, fsync: bool = False) -> None:
    """Append one record as one line and flush it (``fsync=True`` also forces it to disk)."""
    line = _dumps(record)
    if "\n" in line:  # json.dumps escapes newlines; this would only happen with a custom encoder
        raise DataError(f"{path}: record serialises to more than one line")
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write all records to ``path`` atomically (temp file + fsync + rename); returns the number written."""
    lines = [_dumps(record) + "\n" for record in records]
    atomic_write_bytes(path, "".join(lines).encode("utf-8"))
    return len(lines)


def _is_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except ValueError:
        return False


def repair_tail(path: str | os.PathLike) -> bytes:
    """Cut a torn last line (not a valid JSON object: a run killed mid-write) off ``path`` so that the next
    ``append_jsonl`` starts on a fresh line, terminate a complete last record that lacks its newline, and return
    the file's (repaired) bytes; ``b""`` when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return b""
    data = path.read_bytes()
    keep = len(data)
    if data and not data.endswith(b"\n"):
        last_nl = data.rfind(b"\n")
        if _is_object(data[last_nl + 1:]):  # complete but unterminated: terminate it
            with open(path, "ab") as f:
                f.write(b"\n")
            data += b"\n"
            keep = len(data)
        else:
            keep = last_nl + 1  # 0 when the only line is torn
    else:
        # a complete-looking last line can still be garbage if the writer died between write and newline
        body = data.rstrip(b"\n")
        last_nl = body.rfind(b"\n")
        tail = body[last_nl + 1:]
        if tail.strip() and not _is_object(tail):
            keep = last_nl + 1
    if keep != len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
    return data[:keep]


def completed_records(path: str | os.PathLike, id_field: str = "id", field: str = "question") -> dict:
    """id -> (line number, the record's ``field``) for the complete records in ``path`` (first line of an id
    wins); a torn last line is cut off first (:func:`repair_tail`). A malformed line elsewhere is an error."""
    path = Path(path)
    data = repair_tail(path)
    found: dict = {}
    for line_no, obj in _iter_lines(path, data.decode("utf-8", errors="strict")):
        if id_field not in obj:
            raise DataError(f"{path}:{line_no}: missing field {id_field!r}")
        found.setdefault(obj[id_field], (line_no, obj.get(field)))
    return found


def completed_ids(path: str | os.PathLike, id_field: str = "id") -> set:
    """Ids of the complete records in ``path`` (empty set when it does not exist); a torn last line is cut off
    first (:func:`repair_tail`), a malformed line anywhere else is an error."""
    return set(completed_records(path, id_field))
