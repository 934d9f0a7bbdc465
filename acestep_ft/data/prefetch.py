"""Batch preparation overlapped with the step: read + collate batch N+1 (and copy it to the GPU) while step N runs.

On a CUDA device with `device_prefetch`, a worker thread pulls batches from a `BatchStream` into a small queue (the
stream collates them straight into pinned memory when it pins; others are pinned here) and copies each to the GPU on
a side stream (then converts it to float32 there); the consumer makes its stream wait for that copy. Reading mmapped
shards, collating and pinning are memory copies that release the GIL, so a thread overlaps them with GPU work better
than DataLoader worker processes, which would have to ship every MB-sized batch between processes.

Without a CUDA device there is no idle device to overlap with: the step's compute already uses every core, so
batches are then prepared synchronously, on the plain path, and the time spent preparing them is what `next()`
reports as waited. Measured on a 2-core CPU (tiny decoder, fp32, 2 intra-op threads, batches of 4 real-size clips of
10-240 s from v3 shards, median of 3 runs of 12 steps): with the machine otherwise idle, 407 ms per step synchronous
(1.4 % of it waiting for the batch) against 509 ms with the worker thread, which competes with the step's two
threads for the two cores. With other processes busy on the machine the worker thread was 2-3x faster (0.84-1.6 s
against 2.5-4.1 s per step), but not by overlapping anything: the synchronous steps spent 3-4x the CPU time in
OpenMP's spin-waits (GNU OpenMP spins at every barrier while it manages no more threads than there are cores), and
a second, idle OpenMP team, OMP_WAIT_POLICY=PASSIVE or torch.set_num_threads(1) gave the synchronous path the same
speed. On the default generated data both paths take ~19 ms per step.

Memory is reused: the stream collates into a ring of batch buffers and, on a CPU device, the float32 conversion
writes into a second ring, instead of new memory for each batch that the kernel faults in page by page (4 clips of
up to 6000 frames with [769, 2048] condition states in bf16: collate + float32 3.3-3.8 ms and no page faults per
batch, against 4.0-7.4 ms and 1,400-3,800 minor faults with fresh memory; the rings then hold ~130 MB). On a CUDA
device the ring is pinned, so the copy to the GPU is asynchronous without pinning each batch.

Resume stays exact: each queued batch carries the stream's position right after it, and `state_dict()` reports the
position after the last batch handed out, not the worker's read-ahead position.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Any, Deque, Dict, Optional, Tuple

import torch

from acestep_ft.data.batch import Batch
from acestep_ft.data.collate import BatchBuffers, to_float32
from acestep_ft.data.loader import BatchStream

_STOP = object()


class Prefetcher:
    """`next()` -> (float32 batch on `device`, seconds the caller waited for it). Call `close()` when done.

    A batch from `next()` stays unchanged until the following `next()` returns: its memory may then be reused.
    """

    def __init__(self, batches: BatchStream, device: torch.device, depth: int = 2, device_prefetch: bool = True,
                 background: Optional[bool] = None):
        """`background` None = a worker thread exactly when the batches go to a CUDA device with device_prefetch.

        The stream is switched to a ring of `slots` reused batch buffers (and a CPU device gets a float32 ring of as
        many): enough that no batch alive is written. Alive while batch n is made: the synchronous path, batch n-1
        (the caller's); the worker thread, batches n-1-depth .. n-1 (the caller's and up to `depth` queued; the
        worker makes n only after queueing n-1), so depth + 2 slots. A CUDA copy reads its pinned slot
        asynchronously: before a slot is written again, the worker waits for the copy of the batch it last held."""
        self.batches = batches
        self.device = torch.device(device)
        on_cuda = device_prefetch and self.device.type == "cuda"
        self.background = on_cuda if background is None else background
        self.cuda_copy = on_cuda and self.background  # the side-stream copy is synchronised in the queue path only
        self.stream = torch.cuda.Stream(self.device) if self.cuda_copy else None
        self._state = batches.state_dict()
        depth = max(1, depth)
        self.slots = depth + 2 if self.background else 2
        if hasattr(batches, "reuse_buffers"):  # a stream without a ring (a test double) keeps making new memory
            batches.reuse_buffers(self.slots)
        self._float32 = BatchBuffers(self.slots) if self.device.type == "cpu" else None
        self._copies: Deque[torch.cuda.Event] = deque()  # the side-stream copies of the last `slots` batches
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="batch-prefetch", daemon=True)
        if self.background:
            self._thread.start()

    def _prepare(self, batch: Batch) -> Tuple[Batch, Optional[torch.cuda.Event]]:
        """Ready for the model: on the device, in float32 (converted after the copy: half the bytes cross)."""
        if self._float32 is not None:
            return to_float32(batch, self._float32), None
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
                if len(self._copies) == self.slots:  # the slot about to be written was last read by this copy
                    self._copies.popleft().synchronize()
                batch = self.batches.next_batch()
                item = (*self._prepare(batch), self.batches.state_dict())
                if item[1] is not None:
                    self._copies.append(item[1])
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
