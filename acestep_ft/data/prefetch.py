"""Batch preparation overlapped with the step: read + collate batch N+1 (and copy it to the GPU) while step N runs.

On a CUDA device with `device_prefetch`, a worker thread pulls batches from a `BatchStream` into a small queue, pins
each one and copies it to the GPU on a side stream (then converts it to float32 there); the consumer makes its
stream wait for that copy. Reading mmapped shards, collating and pinning are memory copies that release the GIL, so a
thread overlaps them with GPU work better than DataLoader worker processes, which would have to ship every MB-sized
batch between processes.

Without a CUDA device there is no idle device to overlap with: the step's compute already uses every core, and a
background thread measurably slowed CPU steps (docs/benchmarks.md), so batches are then prepared synchronously, on
the plain path, and the time spent preparing them is what `next()` reports as waited.

Resume stays exact: each queued batch carries the stream's position right after it, and `state_dict()` reports the
position after the last batch handed out, not the worker's read-ahead position.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Dict, Optional, Tuple

import torch

from acestep_ft.data.batch import Batch
from acestep_ft.data.loader import BatchStream

_STOP = object()


class Prefetcher:
    """`next()` -> (float32 batch on `device`, seconds the caller waited for it). Call `close()` when done."""

    def __init__(self, batches: BatchStream, device: torch.device, depth: int = 2, device_prefetch: bool = True,
                 background: Optional[bool] = None):
        """`background` None = a worker thread exactly when the batches go to a CUDA device with device_prefetch."""
        self.batches = batches
        self.device = torch.device(device)
        on_cuda = device_prefetch and self.device.type == "cuda"
        self.background = on_cuda if background is None else background
        self.cuda_copy = on_cuda and self.background  # the side-stream copy is synchronised in the queue path only
        self.stream = torch.cuda.Stream(self.device) if self.cuda_copy else None
        self._state = batches.state_dict()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="batch-prefetch", daemon=True)
        if self.background:
            self._thread.start()

    def _prepare(self, batch: Batch) -> Tuple[Batch, Optional[torch.cuda.Event]]:
        """Ready for the model: on the device, in float32 (converted after the copy: half the bytes cross)."""
        if not self.cuda_copy:
            return batch.to(self.device).float(), None
        with torch.cuda.stream(self.stream):
            moved = batch.pin_memory().to(self.device, non_blocking=True).float()
            event = torch.cuda.Event()
            event.record(self.stream)
        return moved, event

    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self.batches.next_batch()
                item = (*self._prepare(batch), self.batches.state_dict())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as err:  # hand the error (e.g. a DataError naming the shard) to the consumer
            self._queue.put((_STOP, err, None))

    def next(self) -> Tuple[Batch, float]:
        started = time.perf_counter()
        if not self.background:
            batch, _ = self._prepare(self.batches.next_batch())
            self._state = self.batches.state_dict()
            return batch, time.perf_counter() - started
        batch, event, state = self._queue.get()
        if batch is _STOP:
            raise event
        waited = time.perf_counter() - started
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for tensor in batch.tensors():
                tensor.record_stream(current)  # the side stream's allocation is now used on the compute stream
        self._state = state
        return batch, waited

    def state_dict(self) -> Dict[str, Any]:
        """The stream position after the last batch returned by `next()`."""
        return self._state

    def close(self) -> None:
        self._stop.set()
        if not self.background:
            return
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()
