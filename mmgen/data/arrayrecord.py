"""ArrayRecord files of mmgen records (records.encode_record): writing and opening.

Files are written with `group_size:1`, which random access needs (one record per chunk),
to a temporary name beside the target and renamed into place, so a crashed writer never
leaves a half file under the real name. Paths are what the array_record library opens
(local files; object stores through a FUSE mount).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from array_record.python import array_record_module

from mmgen.data.records import encode_record

WRITER_OPTIONS = "group_size:1"
# No readahead: grain reads single records in random order.
READER_OPTIONS = "readahead_buffer_size:0"


def write_array_record(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Writes `records` (dicts, see records.py) to one ArrayRecord file; returns the count."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    writer = array_record_module.ArrayRecordWriter(tmp, WRITER_OPTIONS)
    count = 0
    try:
        for record in records:
            writer.write(encode_record(record))
            count += 1
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        if writer.is_open():
            writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return count


def count_records(path: str) -> int:
    """Number of records in an ArrayRecord file (reads its footer only)."""
    reader = array_record_module.ArrayRecordReader(path, READER_OPTIONS)
    try:
        return reader.num_records()
    finally:
        reader.close()


def open_reader(path: str):
    """A reader for random access; its `read([i, ...])` may be called from many threads."""
    return array_record_module.ArrayRecordReader(path, READER_OPTIONS)
