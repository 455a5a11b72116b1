"""NeMo JSON-lines manifests, read lazily (SPEC §3.1).

A manifest holds one JSON object per line: ``audio_filepath`` (or ``audio_filename``), ``duration`` in seconds,
optional ``offset``, ``orig_sample_rate``, ``speaker``, ``lang``; ``text`` is ignored.

:class:`ManifestIndex` scans its files once and keeps, per kept line, only a byte offset, a line number and a
duration in numpy arrays (20 bytes an item, no Python objects): a line is re-read and parsed when its item is
asked for. Host memory therefore does not grow with the manifest's text, and forked DataLoader workers share the
arrays copy-on-write (NeMo keeps a Python list of dicts, whose refcounts defeat copy-on-write: the host-RAM OOM
users see with large manifests).

Bad lines (not JSON, not an object, no path, a non-numeric duration) are skipped at scan time with a warning that
names the file and line number, and counted in ``ManifestIndex.bad_lines``; ``strict=True`` raises
:class:`ManifestError` instead. A missing manifest file always raises :class:`ManifestError`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

log = logging.getLogger("nest_fast.data")

PathList = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], None]


class ManifestError(ValueError):
    """A manifest is missing, unreadable, or holds a bad line (the message names file and line)."""


@dataclass(frozen=True)
class ManifestEntry:
    """One manifest item. ``audio_filepath`` is resolved against the manifest's folder when relative."""

    audio_filepath: str
    duration: Optional[float] = None
    offset: Optional[float] = None
    orig_sample_rate: Optional[int] = None
    speaker: Any = None
    lang: Optional[str] = None
    manifest: str = ""
    line: int = 0


def split_manifest_paths(paths: PathList) -> List[str]:
    """A manifest spec as NeMo accepts it: a path, a comma-separated string of paths, a list, or ``None``."""
    if paths is None:
        return []
    if isinstance(paths, (str, os.PathLike)):
        paths = [p for p in str(paths).split(",")]
    out: List[str] = []
    for p in paths:
        if isinstance(p, (list, tuple)):  # NeMo's bucketed form: a list of lists
            out.extend(split_manifest_paths(list(p)))
            continue
        p = str(p).strip()
        if p:
            out.append(p)
    return out


def resolve_audio_path(audio_file: str, manifest_file: str) -> str:
    """NeMo's ``get_full_path``: a relative path is taken relative to the manifest's folder when that file
    exists there, else it is kept as written (relative to the working directory)."""
    audio_file = os.path.expanduser(str(audio_file))
    if os.path.isabs(audio_file) or not manifest_file:
        return audio_file
    candidate = os.path.join(os.path.dirname(os.path.abspath(manifest_file)), audio_file)
    if os.path.exists(candidate) or not os.path.exists(audio_file):
        return candidate
    return audio_file


def parse_manifest_line(line: Union[str, bytes], manifest_file: str = "", lineno: int = 0) -> ManifestEntry:
    """Parse one JSON line into a :class:`ManifestEntry`; raises :class:`ManifestError` naming file:line."""
    where = f"{manifest_file}:{lineno}"
    try:
        item = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"{where}: line is not valid JSON ({e})") from None
    if not isinstance(item, dict):
        raise ManifestError(f"{where}: line is not a JSON object")
    # NeMo's _parse_manifest_item: 'audio_filename' wins when both are present
    path = item["audio_filename"] if "audio_filename" in item else item.get("audio_filepath")
    if not isinstance(path, str) or not path:
        raise ManifestError(f"{where}: no 'audio_filepath' (or 'audio_filename') in the line")

    def num(key, cast=float):
        v = item.get(key)
        if v is None:
            return None
        try:
            v = cast(v)
        except (TypeError, ValueError):
            raise ManifestError(f"{where}: '{key}' is not a number: {item.get(key)!r}") from None
        if isinstance(v, float) and not math.isfinite(v):
            raise ManifestError(f"{where}: '{key}' is not finite: {item.get(key)!r}")
        return v

    return ManifestEntry(audio_filepath=resolve_audio_path(path, manifest_file), duration=num("duration"),
                         offset=num("offset"), orig_sample_rate=num("orig_sample_rate", int),
                         speaker=item.get("speaker"), lang=item.get("lang"), manifest=manifest_file, line=lineno)


def iter_manifest(path: str, strict: bool = True) -> Iterator[Tuple[int, int, Optional[ManifestEntry], str]]:
    """Stream ``(byte_offset, lineno, entry_or_None, error)`` over a manifest file without holding it."""
    if not os.path.isfile(path):
        raise ManifestError(f"manifest not found: {path}")
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            try:
                yield start, lineno, parse_manifest_line(raw, path, lineno), ""
            except ManifestError as e:
                if strict:
                    raise
                yield start, lineno, None, str(e)


class ManifestIndex:
    """A lazily read list of manifest entries from one or more manifest files.

    ``ManifestIndex(paths, min_duration=None, max_duration=None, strict=False)``; ``len(index)``,
    ``index[i]`` → :class:`ManifestEntry` (re-read from disk), ``index.durations`` (float64 array, NaN where
    the manifest gives none), ``index.total_duration``. Items whose ``duration`` lies outside
    ``[min_duration, max_duration]`` are dropped (items without a duration are kept), as NeMo does.
    """

    def __init__(self, paths: PathList, min_duration: Optional[float] = None,
                 max_duration: Optional[float] = None, strict: bool = False, what: str = "manifest"):
        self.files = [os.path.abspath(os.path.expanduser(p)) for p in split_manifest_paths(paths)]
        for p in self.files:
            if not os.path.isfile(p):
                raise ManifestError(f"{what} not found: {p}")
        self.min_duration, self.max_duration = min_duration, max_duration
        self.bad_lines: List[str] = []  # the first 100 messages
        self.num_bad_lines = 0
        self.num_filtered = 0
        file_ids, offsets, linenos, durations = [], [], [], []
        for fid, path in enumerate(self.files):
            o, l, d = [], [], []
            for start, lineno, entry, err in iter_manifest(path, strict=strict):
                if entry is None:
                    self.num_bad_lines += 1
                    if len(self.bad_lines) < 100:
                        self.bad_lines.append(err)
                        log.warning("skipping manifest line: %s", err)
                    continue
                dur = entry.duration
                if dur is not None and ((min_duration is not None and dur < min_duration)
                                        or (max_duration is not None and dur > max_duration)):
                    self.num_filtered += 1
                    continue
                o.append(start)
                l.append(lineno)
                d.append(math.nan if dur is None else dur)
            file_ids.append(np.full(len(o), fid, dtype=np.int32))
            offsets.append(np.asarray(o, dtype=np.int64))
            linenos.append(np.asarray(l, dtype=np.int32))
            durations.append(np.asarray(d, dtype=np.float64))
        cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dtype=dt)  # noqa: E731
        self._file_id = cat(file_ids, np.int32)
        self._offset = cat(offsets, np.int64)
        self._lineno = cat(linenos, np.int32)
        self.durations = cat(durations, np.float64)
        self._handles: Dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self._offset.shape[0])

    @property
    def total_duration(self) -> float:
        d = self.durations
        return float(np.nansum(d)) if d.size else 0.0

    def _handle(self, fid: int):
        if self._pid != os.getpid():  # forked into a worker: never share file positions with the parent
            self._handles, self._pid = {}, os.getpid()
        h = self._handles.get(fid)
        if h is None:
            h = self._handles[fid] = open(self.files[fid], "rb")
        return h

    def __getitem__(self, i: int) -> ManifestEntry:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"manifest index {i} out of range ({n} items)")
        i = int(i) % n
        fid = int(self._file_id[i])
        h = self._handle(fid)
        h.seek(int(self._offset[i]))
        return parse_manifest_line(h.readline(), self.files[fid], int(self._lineno[i]))

    def __iter__(self) -> Iterator[ManifestEntry]:
        for i in range(len(self)):
            yield self[i]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles = {}

    def __repr__(self) -> str:
        return (f"ManifestIndex({len(self)} items, {self.total_duration / 3600:.2f} h, files={self.files}, "
                f"filtered={self.num_filtered}, bad_lines={self.num_bad_lines})")


def write_manifest(path: str, entries: Iterable[Dict[str, Any]]) -> str:
    """Write dicts as a JSON-lines manifest (atomically: a temporary file renamed into place)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for e in entries:
            f.write(json.dumps(e) + "\n")
    os.replace(tmp, path)
    return path
