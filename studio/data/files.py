"""Read a data file into a list of dict records, or fail with a message that names the place.

Contract: ``read_records(path)`` accepts JSONL, a JSON array (or an object holding one list), CSV
(quoted fields may hold newlines) and Parquet; a UTF-8 BOM and Windows line endings are accepted, and
text with a UTF-16 or UTF-32 byte-order mark is decoded.  It returns ``Records``: a list of plain
Python dicts (Parquet lists and structs become lists and dicts, never numpy arrays) that also knows
where each record came from (``records.where(i)``: "d.jsonl line 7", "d.csv line 3", "d.json item 4",
"d.parquet row 4"), so later errors name the place.  Every failure raises ``DataError`` whose text
names the file, the line where one applies, the reason and what to do; nothing is written and the file
is never modified.  Files larger than ``max_upload_bytes()`` are refused by their size before any byte
is parsed.  Refused rather than guessed: duplicate column names (CSV, Parquet), a quote never closed
in a CSV (it would swallow every later row), JSON nested too deeply to parse.
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


class Records(list):
    """The records of one source, with where each one came from (for messages that name the place)."""

    def __init__(self, items=(), source: str = "data", unit: str = "record", lines: list[int] | None = None):
        super().__init__(items)
        self.source, self.unit, self.lines = source, unit, lines

    def where(self, i: int) -> str:
        """Where record ``i`` (0-based) came from: "d.jsonl line 7", "d.json item 4", "d.parquet row 2"."""
        n = self.lines[i] if self.lines is not None and i < len(self.lines) else i + 1
        return f"{self.source} {self.unit} {n}"


def where_of(records, i: int, source: str = "data") -> str:
    return records.where(i) if isinstance(records, Records) else f"{source} example {i + 1}"


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


_BOMS = ((b"\x00\x00\xfe\xff", "utf-32-be"), (b"\xff\xfe\x00\x00", "utf-32-le"),
         (b"\xfe\xff", "utf-16-be"), (b"\xff\xfe", "utf-16-le"))


def _text(path: Path) -> str:
    raw = path.read_bytes()
    # Spreadsheet and Windows tools save "Unicode text" as UTF-16 with a byte-order mark: read it as such.
    encoding = next((enc for bom, enc in _BOMS if raw.startswith(bom)), None)
    if encoding is None and b"\x00" in raw[:8192]:
        head = raw[:8192]
        even, odd = head[0::2], head[1::2]
        # UTF-16 of mostly ASCII text: every other byte is zero, the others almost never are.
        if len(head) >= 16 and any(a.count(0) > 0.9 * len(a) and b.count(0) < 0.1 * len(b)
                                   for a, b in ((odd, even), (even, odd))):
            raise DataError(f"{path.name}: this looks like UTF-16 text without a byte-order mark; save the file "
                            "as UTF-8.")
        raise DataError(f"{path.name}: this is a binary file (an image or archive?), not text; "
                        "upload a JSONL, JSON, CSV or Parquet file.")
    try:
        text = raw[len(next(b for b, e in _BOMS if e == encoding)):].decode(encoding) if encoding \
            else raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1 if not encoding else raw[: e.start].decode(encoding, "replace") \
            .count("\n") + 1
        raise DataError(f"{path.name} line {line}: not valid {encoding or 'UTF-8'} text; save the file as "
                        "UTF-8.") from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise DataError(f"{path.name} line {line}: holds a NUL character; this is not a text file, or it is "
                        "damaged.")
    if not text.strip():
        raise DataError(f"{path.name}: the file holds only whitespace; choose a file with examples.")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_records(path: str | Path) -> Records:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file.")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path.name}: unsupported file type '{suffix}'; use one of {', '.join(SUFFIXES)}.")
    check_size(path)
    if suffix == ".parquet":
        records = _parquet(path)
    else:
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


# The C JSON parser raises RecursionError for deep nesting (~1000 levels): a message, not a traceback.
_TOO_DEEP = "nested too deeply to read (hundreds of levels of [ or {); flatten that value or remove it"


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list) -> dict:
    """json's object hook: a key given twice in one object would silently keep only its last value."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def _jsonl(name: str, text: str) -> Records:
    out, lines = [], []
    for n, line in enumerate(text.split("\n"), 1):
        line = line.lstrip("\ufeff")  # files joined with cat keep each one's BOM at the start of a line
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_unique_keys)
        except RecursionError:
            raise DataError(f"{name} line {n}: {_TOO_DEEP}.") from None
        except _DuplicateKey as e:
            raise DataError(f"{name} line {n}: key '{e}' appears twice in one object; keep one of them.") from None
        except json.JSONDecodeError as e:
            hint = " (is this a JSON array? rename the file to .json)" if n == 1 and line.lstrip().startswith("[") \
                else ""
            raise DataError(f"{name} line {n}: not valid JSON ({e.msg} at column {e.colno}){hint}; "
                            "fix that line or remove it.") from None
        if not isinstance(obj, dict):
            raise DataError(f"{name} line {n}: expected a JSON object {{...}}, found {type(obj).__name__}.")
        out.append(obj)
        lines.append(n)
    return Records(out, name, "line", lines)


def _json(name: str, text: str) -> Records:
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise DataError(f"{name}: {_TOO_DEEP}.") from None
    except _DuplicateKey as e:
        raise DataError(f"{name}: key '{e}' appears twice in one object; keep one of them.") from None
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
    return Records(data, name, "item")


def _csv(name: str, text: str) -> Records:
    # A field may be as long as the file (the default 128 KiB limit would call a long answer bad quoting);
    # strict mode makes a quote that is never closed an error instead of one field that eats every later row.
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1
    try:
        header = next(reader, None)
        cols = [c.strip() for c in header or []]
        if not any(cols):
            raise DataError(f"{name}: the first line must name the columns.")
        sep = next((c for c in (";", "\t", "|") if len(cols) == 1 and c in cols[0]), None)
        if sep:
            shown = {";": "semicolons", "\t": "tabs", "|": "'|'"}[sep]
            raise DataError(f"{name} line 1: the columns are separated by {shown}, not commas; save the file as "
                            "comma-separated CSV.")
        # An unnamed column (a spreadsheet's index, a trailing comma) gets a name the mapping can show.
        cols = [c or f"column {i + 1}" for i, c in enumerate(cols)]
        seen = set()
        for c in cols:
            if c in seen:
                raise DataError(f"{name} line 1: column '{c}' is named twice; rename one of them (otherwise one "
                                "column's values would silently replace the other's).")
            seen.add(c)
        out, lines = [], []
        start = reader.line_num + 1
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip() and len(cols) > 1):
                start = reader.line_num + 1
                continue  # a blank line
            if len(row) > len(cols):
                raise DataError(f"{name} line {start}: more values than columns; quote values that "
                                "contain commas.")
            out.append({c: (row[i] if i < len(row) else "") for i, c in enumerate(cols)})
            lines.append(start)
            start = reader.line_num + 1
    except csv.Error as e:
        if "unexpected end of data" in str(e):
            raise DataError(f"{name} line {start}: a quoted value starting on this line is never closed, so it "
                            "would run to the end of the file; check the quoting.") from None
        raise DataError(f"{name} line {start}: {e}; check the quoting (a quote inside a quoted value is "
                        "written twice: \"\").") from None
    return Records(out, name, "line", lines)


def _parquet(path: Path) -> Records:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path).read()
    except Exception as e:  # pyarrow raises many types for a corrupt file
        raise DataError(f"{path.name}: not a readable Parquet file ({type(e).__name__}).") from None
    names = table.schema.names
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise DataError(f"{path.name}: column '{dup}' is named twice; rename one of them.")
    try:
        # Plain Python values: list cells become lists and structs dicts (pandas would give numpy arrays,
        # whose text form is not the data).
        rows = table.to_pylist()
    except RecursionError:
        raise DataError(f"{path.name}: {_TOO_DEEP}.") from None
    except Exception as e:  # noqa: BLE001 - an unreadable column type (pyarrow raises many types)
        raise DataError(f"{path.name}: a column could not be read ({type(e).__name__}: {str(e)[:200]}).") from None
    return Records(rows, path.name, "row")


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
    return Records([dict(r) for r in ds], f"{dataset_id} ({split})", "row")
