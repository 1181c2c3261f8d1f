"""The training batches of a stream (`--streaming`): each process reads its own shards of the dataset in a
deterministic order, cycling through them for as many steps as the run takes, so every process takes the same number
of steps however unevenly the shards divide.

Each process keeps the same shards in every pass (`IterableDataset.shard`, where
`datasets.distributed.split_dataset_by_node` would deal the shards out again after each pass's shuffle), so a pass
over a process's rows always has the same length.

A stream has no length, so a streamed run is `--max_train_steps` long and its epochs (records, checkpoints, the
schedule's warm-up) are `ceil(max_train_steps / num_epochs)` steps each; passes over the data are independent of
them. The order of a pass is fixed by the seed and the pass's number (the shard order and the shuffle buffer of
`IterableDataset.shuffle`), so where a process stands is a count of rows: a resumed run reads the stream again up
to that count without decoding images (passes it has finished are skipped by their length), and continues exactly
where the interrupted run was. The same number of processes reproduces the same order (rows are read in
the main process; `--num_workers` threads only decode them).
"""

import itertools
import math
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import datasets
import torch

from ..errors import DataFormatError


SHUFFLE_BUFFER = 1000  # rows; prepared rows are small (a 224 x 224 PNG), so this holds a few tens of MB


class StreamingLoader:
    """Batches of `stream` for process `rank` of `world_size`: `steps_per_epoch` batches of `batch_size` rows per
    epoch of the run, collated by `collate_fn` in `num_workers` threads (decoding a prepared PNG releases the GIL) and
    moved to `device`."""

    def __init__(self, stream: datasets.IterableDataset, collate_fn: Callable[[list[dict]], dict], batch_size: int,
                 steps_per_epoch: int, seed: int, rank: int, world_size: int, device: torch.device,
                 num_workers: int = 0):
        if stream.num_shards < world_size:
            raise DataFormatError(f"the stream has {stream.num_shards} shard(s) for {world_size} processes; give "
                                  "--dataset_name as at least as many files as processes, or a save_to_disk folder.")
        self.stream = stream.shard(num_shards=world_size, index=rank)
        self.collate_fn, self.batch_size, self.steps_per_epoch = collate_fn, batch_size, steps_per_epoch
        self.seed, self.rank, self.device, self.num_workers = seed, rank, device, num_workers
        self._rows: Iterator[dict] | None = None
        self._position = -1  # rows of the stream `_rows` has handed out

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _pass(self, number: int) -> datasets.IterableDataset:
        """Pass `number` over this process's rows, in its fixed order."""
        shuffled = self.stream.shuffle(seed=self.seed, buffer_size=SHUFFLE_BUFFER)
        shuffled.set_epoch(number)
        return shuffled

    def _rows_from(self, position: int) -> Iterator[dict]:
        """Every row from `position` on (counted over passes), pass after pass."""
        number, skip = 0, position
        while True:
            length = 0
            for row in self._pass(number):
                length += 1
                if length > skip:
                    yield row
            if length == 0:
                raise DataFormatError(f"process {self.rank}'s shards of the stream hold no rows; give --dataset_name "
                                      "as files that each hold rows.")
            skip = max(0, skip - length)
            number += 1 + skip // length  # every pass over this process's rows has the same length
            skip %= length

    def epoch_batches(self, epoch: int, step_in_epoch: int = 0) -> Iterator[dict]:
        """The batches of the run's `epoch` from its `step_in_epoch`-th on."""
        position = (epoch * self.steps_per_epoch + step_in_epoch) * self.batch_size
        if position != self._position:
            self._rows, self._position = self._rows_from(position), position
        steps = self.steps_per_epoch - step_in_epoch
        row_batches = (list(itertools.islice(self._rows, self.batch_size)) for _ in range(steps))
        completed = False
        try:
            for batch in self._collated(row_batches):
                yield {name: value.to(self.device, non_blocking=True) for name, value in batch.items()}
            completed = True
        finally:  # a loop left early (the run stopped) leaves `_rows` somewhere in the epoch: read it again next time
            self._position = position + steps * self.batch_size if completed else -1

    def _collated(self, row_batches: Iterator[list[dict]]) -> Iterator[dict]:
        if not self.num_workers:
            yield from map(self.collate_fn, row_batches)
            return
        with ThreadPoolExecutor(self.num_workers) as pool:
            pending = deque()
            for rows in row_batches:
                pending.append(pool.submit(self.collate_fn, rows))
                if len(pending) > self.num_workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()


def steps_per_epoch(max_train_steps: int, num_epochs: int) -> int:
    return math.ceil(max_train_steps / num_epochs)


__all__ = ["StreamingLoader", "steps_per_epoch"]
