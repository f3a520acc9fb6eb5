"""Document readers: text, JSON Lines, parquet, datasets dirs, hub datasets and TinyTales."""

from __future__ import annotations

import codecs
import json
import os
import re
import socket
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tinylm.core.errors import TinylmError, optional_import

# ----- reading documents -------------------------------------------------------------------------------
# Input kinds: .txt (documents separated by blank lines: a line that is empty or only whitespace ends a
# document; TinyTales writes stories this way), .jsonl/.ndjson/.json (one JSON object per line, the
# text in a field), .parquet (a text column), directories of these (recursive, sorted; any other file
# is read as text), a `datasets.save_to_disk` dir, `tinytales:<n>` and, online, a hub dataset name.

_JSONL = (".jsonl", ".ndjson", ".json")  # HF writes JSON Lines as .json too


_HF_DISK_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


_HUB_NAME = re.compile(r"(hf:)?[A-Za-z0-9][\w.-]*/[\w.-]+")


# Cc characters other than \t and \n (\r is turned into \n first): C0 controls, DEL, C1 controls.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@dataclass
class Source:
    """One input: kind is "txt", "jsonl", "parquet", "hf_disk", "hub" or "tinytales"; name is its path
    or spec as the user wrote it."""

    kind: str
    name: str


def _file_source(path: Path) -> Source:
    suffix = path.suffix.lower()
    kind = "jsonl" if suffix in _JSONL else "parquet" if suffix == ".parquet" else "txt"
    return Source(kind, str(path))


def resolve_inputs(inputs: list[str]) -> list[Source]:
    """Expand the user's inputs into sources, in order; a missing path is a one-line error.

    Args:
        inputs: paths, dirs, `tinytales:<n>` or hub dataset names.
    """
    if not inputs:
        raise TinylmError("no inputs given")
    sources = []
    for spec in inputs:
        path = Path(spec)
        if spec.startswith("tinytales:"):
            sources.append(Source("tinytales", spec))
        elif path.is_dir() and any((path / m).is_file() for m in _HF_DISK_MARKERS):
            sources.append(Source("hf_disk", spec))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
                part.startswith(".") for part in p.relative_to(path).parts))
            sources.extend(_file_source(p) for p in files)
        elif path.exists():
            sources.append(_file_source(path))
        elif _HUB_NAME.fullmatch(spec) and path.suffix.lower() not in (".txt", ".parquet", *_JSONL):
            sources.append(Source("hub", spec.removeprefix("hf:")))
        else:
            raise TinylmError(f"no such file or directory: {spec}")
    if not sources:
        raise TinylmError(f"no input files in {', '.join(inputs)}")
    return sources


def _is_utf8_text(path: Path) -> bool:
    """True when the file decodes as UTF-8 and has no NUL byte in its first 8 KiB (a binary file)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as f:
            head = f.read(8192)
            if b"\0" in head:
                return False
            decoder.decode(head)
            while chunk := f.read(1 << 20):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    except OSError as e:
        raise TinylmError(f"cannot read {path}: {e.strerror}") from None
    return True


def _read_txt(path: str) -> Iterator[str]:
    lines: list[str] = []
    # utf-8-sig drops a byte-order mark; universal newlines turn \r\n and \r into \n
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines)
                lines = []
    if lines:
        yield "".join(lines)


def _read_jsonl(path: str, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TinylmError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise TinylmError(f"{path}:{lineno}: no field {field!r} (choose one with --text-field)")
            if not isinstance(record[field], str):
                raise TinylmError(f"{path}:{lineno}: field {field!r} is not a string")
            yield record[field]


def read_jsonl(path: str, what: str) -> list[Any]:
    """Every line of a JSONL file, parsed; a missing file or a bad line is a one-line error.

    Args:
        path: the file.
        what: what it holds, for messages ("--data").
    """
    if not path:
        raise TinylmError(f"{what} is required")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TinylmError(f"cannot read {what} {path}: {e}") from None
    rows = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise TinylmError(f"{path}:{i} is not JSON: {e}") from None
    return rows


def _read_parquet(path: str, field: str) -> Iterator[str]:
    pq = optional_import("pyarrow.parquet", "data", f"{path}: reading it")

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses for corrupt files
        raise TinylmError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    if field not in pf.schema_arrow.names:
        raise TinylmError(f"{path}: no column {field!r} (has {', '.join(pf.schema_arrow.names)}; use --text-field)")
    for batch in pf.iter_batches(batch_size=1024, columns=[field]):
        yield from (t for t in batch.column(0).to_pylist() if t is not None)


def _read_datasets(ds: Any, name: str, field: str) -> Iterator[str]:
    """Documents of a `datasets` Dataset / DatasetDict (the "train" split when there is one)."""
    if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # a DatasetDict: pick splits
        parts = [ds["train"]] if "train" in ds else [ds[k] for k in sorted(ds)]
    else:
        parts = [ds]
    for part in parts:
        names = part.column_names or []
        if field not in names:
            raise TinylmError(f"{name}: no column {field!r} (has {', '.join(names)}; use --text-field)")
        for row in part:
            if isinstance(row[field], str):
                yield row[field]


def _hub_reachable() -> bool:
    """False when offline (HF_HUB_OFFLINE set, or huggingface.co does not resolve), to fail in
    milliseconds instead of after datasets' retries."""
    if any(os.environ.get(v, "0") not in ("", "0") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    try:
        socket.getaddrinfo("huggingface.co", 443)
    except OSError:
        return False
    return True


def _read_hub(name: str, field: str) -> Iterator[str]:
    if not _hub_reachable():
        raise TinylmError(f"{name}: no such file or directory, and the Hugging Face hub is unreachable (offline)")
    datasets = optional_import("datasets", "data", f"{name}: reading it")
    try:
        # never run a dataset repo's loading script (datasets < 2.20 ran it by default; pyproject's floor)
        ds = datasets.load_dataset(name, split="train", streaming=True, trust_remote_code=False)
        yield from _read_datasets(ds, name, field)
    except TinylmError:
        raise
    except Exception as e:  # offline, unknown name, gated: datasets raises many types
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise TinylmError(f"{name}: not a file, and loading it from the Hugging Face hub failed "
                          f"(offline? {first})") from None


def _read_tinytales(spec: str, seed: int) -> Iterator[str]:
    try:
        n = int(spec.split(":", 1)[1])
    except ValueError:
        raise TinylmError(f"{spec}: expected tinytales:<number of stories>") from None
    from tinylm.data.tinytales import generate

    for story in generate(n, seed):
        yield story["text"] if isinstance(story, dict) else str(story)


def read_documents(sources: list[Source], text_field: str = "text", seed: int = 0,
                   skipped: list[str] | None = None) -> Iterator[str]:
    """Stream the raw documents of `sources` in order, one at a time (memory stays bounded).

    Args:
        sources: from `resolve_inputs`.
        text_field: the JSON field / parquet or datasets column holding the text.
        seed: seed of generated corpora (tinytales).
        skipped: binary or non-UTF-8 files are skipped and appended here (None: they are an error).
    """
    for src in sources:
        if src.kind in ("txt", "jsonl") and not _is_utf8_text(Path(src.name)):
            if skipped is None:
                raise TinylmError(f"{src.name}: binary or not UTF-8 text")
            skipped.append(src.name)
            continue
        if src.kind == "txt":
            yield from _read_txt(src.name)
        elif src.kind == "jsonl":
            yield from _read_jsonl(src.name, text_field)
        elif src.kind == "parquet":
            yield from _read_parquet(src.name, text_field)
        elif src.kind == "hf_disk":
            datasets = optional_import("datasets", "data", f"{src.name}: reading it")
            yield from _read_datasets(datasets.load_from_disk(src.name), src.name, text_field)
        elif src.kind == "hub":
            yield from _read_hub(src.name, text_field)
        else:
            yield from _read_tinytales(src.name, seed)


def clean_text(text: str) -> str:
    """Unicode NFC, \\r\\n and \\r turned into \\n, control characters other than \\n and \\t removed,
    surrounding whitespace stripped."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text)  # returns the input at once when already NFC
    if _CONTROL.search(text):
        text = _CONTROL.sub("", text)
    return text.strip()


def iter_texts(inputs: list[str], text_field: str = "text", seed: int = 0) -> Iterator[str]:
    """Cleaned, non-empty documents of the user's inputs (for tokenizer training and statistics).

    Args:
        inputs: as for `prepare`.
        text_field: the JSON field / column holding the text.
        seed: seed of generated corpora.
    """
    skipped: list[str] = []
    n = 0
    for raw in read_documents(resolve_inputs(inputs), text_field, seed, skipped):
        text = clean_text(raw)
        if text:
            n += 1
            yield text
    if n == 0:
        why = " (only binary or non-UTF-8 files)" if skipped else ""
        raise TinylmError(f"no documents in {', '.join(inputs)}{why}")
