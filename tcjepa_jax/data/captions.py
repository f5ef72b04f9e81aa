"""Caption files: JSONL, one {"id": ..., "captions": [str, ...]} object per line, read by id.

    {"id": "n01440764/n01440764_10026.JPEG", "captions": ["a fish held up on a boat."]}
    {"id": 391895, "captions": ["A man riding a bike.", "A person on a dirt bike."]}

Caption files of web-scale datasets have tens of millions of lines, so they are never loaded:
CaptionFile streams the file once and keeps, per valid line, a 64-bit hash of its id and the
line's byte offset (16 bytes a line, ~0.5 GB for 30M lines), sorted by hash. A lookup seeks to
the line and parses it, and checks the id, so a hash collision costs a comparison, never a wrong
caption.
"""

from __future__ import annotations

import array
import collections
import hashlib
import json
import os
import threading

import numpy as np

_BOM = b"\xef\xbb\xbf"
_CHUNK = 1 << 13


def _hash(key: str) -> int:
    # surrogatepass: ids from file names with undecodable bytes still hash (to themselves)
    return int.from_bytes(
            hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _parse(line: bytes):
    """A line -> (id str, captions list), or the bad-line kind (a str) if it is not valid."""
    try:
        text = line.removeprefix(_BOM).decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8_caption_line"
    try:
        obj = json.loads(text)
    except ValueError:
        return "bad_caption_line"
    if not isinstance(obj, dict):
        return "bad_caption_line"
    key, captions = obj.get("id"), obj.get("captions")
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        return "bad_caption_line"
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, list):
        return "bad_caption_line"
    return str(key), captions


class CaptionFile:
    """Random-access captions from a JSONL file: one {"id": ..., "captions": [str, ...]} object per line.

    `get(key)` returns the caption list as stored (not cleaned: see decode.clean_captions) for the
    first of key, its basename and its basename without extension that is an id in the file, or
    None. A line's id may be a string or an integer (compared as its str); "captions" may be a
    single string (a one-sentence list). Lines that cannot be used are counted in `bad_lines`:
        bad_caption_line            invalid JSON, not an object, or a missing / wrong-typed id or
                                    captions
        invalid_utf8_caption_line   the line is not UTF-8
        duplicate_caption_id        an id already on an earlier line (the first line wins)
    Blank lines are ignored. Picklable and cheap to pickle (the index arrays and the path); the
    file is opened lazily in each process, and reads (os.pread) are thread-safe.
    """

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"caption file {path} does not exist")
        self.path = os.path.abspath(path)
        self.bad_lines = collections.Counter()
        hashes, offsets = array.array("Q"), array.array("q")
        with open(self.path, "rb") as f:
            offset = 0
            for line in f:
                if line.strip():
                    parsed = _parse(line)
                    if isinstance(parsed, str):
                        self.bad_lines[parsed] += 1
                    else:
                        hashes.append(_hash(parsed[0]))
                        offsets.append(offset)
                offset += len(line)
        if not hashes:
            counts = ", ".join(f"{k}: {n}" for k, n in sorted(self.bad_lines.items())) or "empty"
            raise ValueError(
                    f"caption file {path} has no valid lines ({counts}); each line must be a JSON "
                    'object {"id": ..., "captions": ["...", ...]}')
        self._hashes = np.frombuffer(hashes, np.uint64)
        self._offsets = np.frombuffer(offsets, np.int64)
        order = np.argsort(self._hashes, kind="stable")  # equal hashes stay in file order
        self._hashes, self._offsets = self._hashes[order], self._offsets[order]
        self._fd, self._pid, self._lock = None, None, threading.Lock()
        self._drop_duplicates()

    def _drop_duplicates(self) -> None:
        """Removes later lines of a repeated id; keeps colliding hashes of different ids."""
        same = np.flatnonzero(self._hashes[1:] == self._hashes[:-1]) + 1
        if not len(same):
            return
        drop = []
        for start in np.unique(np.searchsorted(self._hashes, self._hashes[same], "left")):
            seen = set()
            end = np.searchsorted(self._hashes, self._hashes[start], "right")
            for i in range(start, end):
                key = _parse(self._read_line(int(self._offsets[i])))[0]  # valid when indexed
                if key in seen:
                    drop.append(i)
                seen.add(key)
        self.bad_lines["duplicate_caption_id"] += len(drop)
        keep = np.ones(len(self._hashes), bool)
        keep[drop] = False
        self._hashes, self._offsets = self._hashes[keep], self._offsets[keep]

    def __len__(self) -> int:
        return len(self._hashes)

    def get(self, key: str) -> list | None:
        base = os.path.basename(key)
        for candidate in dict.fromkeys((key, base, os.path.splitext(base)[0])):
            if not candidate:
                continue
            h = np.uint64(_hash(candidate))
            lo = int(np.searchsorted(self._hashes, h, "left"))
            hi = int(np.searchsorted(self._hashes, h, "right"))
            for i in range(lo, hi):
                parsed = _parse(self._read_line(int(self._offsets[i])))
                if isinstance(parsed, tuple) and parsed[0] == candidate:
                    return parsed[1]
        return None

    # --- file access (lazy, per process) ---------------------------------------------------------

    def _read_line(self, offset: int) -> bytes:
        fd, chunks = self._file(), []
        while True:
            chunk = os.pread(fd, _CHUNK, offset)
            end = chunk.find(b"\n")
            if end >= 0 or len(chunk) < _CHUNK:
                chunks.append(chunk if end < 0 else chunk[:end])
                return b"".join(chunks)
            chunks.append(chunk)
            offset += len(chunk)

    def _file(self) -> int:
        if self._pid != os.getpid():  # first use in this process (or after a fork)
            with self._lock:
                if self._pid != os.getpid():
                    self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def close(self) -> None:
        with self._lock:
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
            self._fd, self._pid = None, None

    def __del__(self):
        try:
            self.close()
        except Exception:  # pylint: disable=broad-except  # interpreter shutdown
            pass

    def __getstate__(self):
        return {"path": self.path, "bad_lines": self.bad_lines, "hashes": self._hashes,
                "offsets": self._offsets}

    def __setstate__(self, state):
        self.path, self.bad_lines = state["path"], state["bad_lines"]
        self._hashes, self._offsets = state["hashes"], state["offsets"]
        self._fd, self._pid, self._lock = None, None, threading.Lock()
