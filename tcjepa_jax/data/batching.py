"""Full batches of good examples, with every skipped record and dropped caption counted by kind.

Examples are made in Grain worker processes; a record that fails there comes back as a small
marker ({"skipped": kind, ...}) instead of raising. Dropping the markers and stacking batches
happens here, in the training process, after the workers' outputs are merged back into their
deterministic order: so batches do not depend on the number of workers, the counts are exact
for what training consumed, and they are part of the iterator's checkpointed state.
"""

from __future__ import annotations

import collections
import logging

import grain
import numpy as np

_MAX_LOGGED = 5


class BadRecordCounter:
    """Counts of skipped records and dropped caption sentences, by kind.

    A few bad records are skipped; a source where most records fail (wrong format, a bug in a
    custom source) stops the run with the error instead of skipping forever.
    """

    def __init__(self, give_up_after: int = 100, give_up_fraction: float = 0.5):
        self.give_up_after, self.give_up_fraction = give_up_after, give_up_fraction
        self.skipped = collections.Counter()
        self.dropped = collections.Counter()
        self.seen = 0
        self.last_error = ""

    @property
    def count(self) -> int:
        return sum(self.skipped.values())

    def good(self, dropped: dict | None) -> None:
        self.seen += 1
        self.dropped.update(dropped or {})

    def skip(self, marker: dict) -> None:
        self.seen += 1
        self.skipped[marker["skipped"]] += 1
        self.last_error = f"record {marker['index']}: {marker['skipped']}: {marker['error']}"
        n = self.count
        if n <= _MAX_LOGGED:
            logging.warning("Skipping bad record (%d so far) %s", n, self.last_error)
        if n >= self.give_up_after and n > self.give_up_fraction * self.seen:
            raise RuntimeError(
                f"{n} of the first {self.seen} records failed to load ({dict(self.skipped)}); the "
                f"data or the source is broken, not a few records. Last error: {self.last_error}")

    def metrics(self) -> dict:
        """For the training logs: totals and one entry per kind."""
        out = {"bad_records": self.count, "dropped_captions": sum(self.dropped.values())}
        out.update({f"bad_records/{k}": v for k, v in self.skipped.items()})
        out.update({f"dropped_captions/{k}": v for k, v in self.dropped.items()})
        return out

    def get_state(self) -> dict:
        return {"skipped": dict(self.skipped), "dropped": dict(self.dropped), "seen": self.seen}

    def set_state(self, state: dict) -> None:
        self.skipped = collections.Counter(state.get("skipped", {}))
        self.dropped = collections.Counter(state.get("dropped", {}))
        self.seen = int(state.get("seen", 0))


def is_skipped(element) -> bool:
    return "skipped" in element


class GoodBatches(grain.IterDataset):
    """Stacks `batch_size` good examples per batch; skips and counts the markers."""

    def __init__(self, parent: grain.IterDataset, batch_size: int,
                 counter: BadRecordCounter | None = None):
        super().__init__(parent)
        self.batch_size, self.counter = batch_size, counter

    def __iter__(self) -> "GoodBatchesIterator":
        return GoodBatchesIterator(self._parent.__iter__(), self.batch_size,
                                   self.counter or BadRecordCounter())

    def __str__(self) -> str:
        return f"GoodBatches(batch_size={self.batch_size})"


class GoodBatchesIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, batch_size: int, counter: BadRecordCounter):
        super().__init__(parent)
        self.batch_size, self.counter = batch_size, counter

    def __next__(self) -> dict:
        examples = []
        while len(examples) < self.batch_size:
            element = next(self._parent)
            if is_skipped(element):
                self.counter.skip(element)
                continue
            self.counter.good(element.pop("dropped_captions", None))
            examples.append(element)
        return {key: np.stack([e[key] for e in examples]) for key in examples[0]}

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "counts": self.counter.get_state()}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self.counter.set_state(state["counts"])

    def close(self) -> None:
        close = getattr(self._parent, "close", None)
        if close is not None:
            close()
