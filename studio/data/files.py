"""Read a data file into a list of dict records, or fail with a message that names the place.

Contract: ``read_records(path)`` accepts JSONL, a JSON array (or an object holding one list), CSV
(quoted fields may hold newlines) and Parquet; a UTF-8 BOM and Windows line endings are accepted.
Every failure raises ``DataError`` whose text names the file, the line where one applies, the reason
and what to do; nothing is written and the file is never modified.  Files larger than
``max_upload_bytes()`` are refused by their size before any byte is parsed.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataError(ValueError):
    """A data file or dataset could not be used; the message says where and what to do."""


def max_upload_bytes() -> int:
    return int(float(os.environ.get("STUDIO_MAX_UPLOAD_MB", "1024")) * 1024 * 1024)


def check_size(path: Path) -> None:
    size = path.stat().st_size
    limit = max_upload_bytes()
    if size > limit:
        raise DataError(f"{path.name}: {size / 2**20:,.0f} MB is larger than the {limit / 2**20:,.0f} MB limit; "
                        "sample the file or raise STUDIO_MAX_UPLOAD_MB.")
    if size == 0:
        raise DataError(f"{path.name}: the file is empty; choose a file with at least one example.")


def _text(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise DataError(f"{path.name}: this is a binary file (an image or archive?), not text; "
                        "upload a JSONL, JSON, CSV or Parquet file.")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path.name} line {line}: not valid UTF-8 text; save the file as UTF-8.") from None
    if not text.strip():
        raise DataError(f"{path.name}: the file holds only whitespace; choose a file with examples.")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_records(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file.")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path.name}: unsupported file type '{suffix}'; use one of {', '.join(SUFFIXES)}.")
    check_size(path)
    if suffix == ".parquet":
        return _parquet(path)
    text = _text(path)
    if suffix == ".jsonl":
        records = _jsonl(path.name, text)
    elif suffix == ".json":
        records = _json(path.name, text)
    else:
        records = _csv(path.name, text)
    if not records:
        raise DataError(f"{path.name}: no examples found; the file has no records.")
    return records


def _jsonl(name: str, text: str) -> list[dict]:
    out = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            hint = " (is this a JSON array? rename the file to .json)" if n == 1 and line.lstrip().startswith("[") \
                else ""
            raise DataError(f"{name} line {n}: not valid JSON ({e.msg} at column {e.colno}){hint}; "
                            "fix that line or remove it.") from None
        if not isinstance(obj, dict):
            raise DataError(f"{name} line {n}: expected a JSON object {{...}}, found {type(obj).__name__}.")
        out.append(obj)
    return out


def _json(name: str, text: str) -> list[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            raise DataError(f"{name} line {e.lineno}: more than one JSON value; if each line is one example, "
                            "rename the file to .jsonl.") from None
        raise DataError(f"{name} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}).") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{name}: expected a JSON array of examples (or an object holding one list).")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a JSON array of examples, found {type(data).__name__}.")
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise DataError(f"{name}: item {i + 1} of the array is {type(obj).__name__}, expected an object.")
    return data


def _csv(name: str, text: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames or not any(f and f.strip() for f in reader.fieldnames):
        raise DataError(f"{name}: the first line must name the columns.")
    out = []
    try:
        for row in reader:
            if None in row:
                raise DataError(f"{name} line {reader.line_num}: more values than columns; quote values that "
                                "contain commas.")
            out.append({k.strip(): (v if v is not None else "") for k, v in row.items() if k is not None})
    except csv.Error as e:
        raise DataError(f"{name} line {reader.line_num}: {e}; check the quoting.") from None
    return out


def _parquet(path: Path) -> list[dict]:
    import pandas as pd

    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises many types for a corrupt file
        raise DataError(f"{path.name}: not a readable Parquet file ({type(e).__name__}).") from None
    return df.to_dict(orient="records")


def read_hub(dataset_id: str, config: str = "", split: str = "train", token: str | None = None) -> list[dict]:
    """Load a Hugging Face dataset split (needs internet); errors become DataError."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a requirement
        raise DataError("the 'datasets' package is not installed.") from None
    from studio.security import SecurityError, local_dataset

    try:
        local_dataset(dataset_id)  # load_dataset reads a local folder too: in the served app, only the studio's
    except SecurityError as e:
        raise DataError(str(e)) from None
    try:
        ds = datasets.load_dataset(dataset_id, config or None, split=split, token=token)
    except Exception as e:
        from studio.security import redact

        raise DataError(f"hub dataset {dataset_id!r} (split {split!r}) could not be loaded: "
                        f"{redact(str(e))[:300]}. Check the id and split, your internet connection, and for a "
                        "gated or private dataset your token.") from None
    return [dict(r) for r in ds]
