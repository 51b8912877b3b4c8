"""Micro-batching of concurrent ``Decide`` calls: calls that arrive together share one
data-plane call, so rows of one model share one model run.

grpc.aio runs every handler on one event loop, so "concurrent" means queued on that loop: the
first call of a batch starts a timer, and the batch is decided when ``max_size`` calls are
waiting or ``max_wait_s`` has passed. Waiting only pays when others join: while the batches
that waited have held fewer than 1.5 calls on average (a moving average), a call that finds no
batch waiting is decided at once, as without batching, so a lone caller does not wait for
company; once a second, one call waits again to see whether the load has come back. Each call
still succeeds or fails on its own; a call cancelled while it waited is left out, so it is
neither decided nor logged.

On by default (``micro_batch_size`` 32, 1 ms); ``micro_batch_size`` 1 turns it off. The serving
benchmark (bench/serving_bench.py, README) measures both side by side.
"""

from __future__ import annotations

import asyncio

from prometheus_client import Histogram

from serving.dataplane import DataPlane, DecideInput, DecideOutput

_PAYS = 1.5  # calls per waited batch below which waiting is not worth it
_PROBE_INTERVAL_S = 1.0


class DecideBatcher:
    """``max_size`` >= 2 and 0 < ``max_wait_s`` <= 1, as ``ServeConfig.validate`` checks."""

    def __init__(self, plane: DataPlane, max_size: int, max_wait_s: float,
                 sizes: Histogram | None = None) -> None:
        self._plane = plane
        self._max_size = max_size
        self._max_wait_s = max_wait_s
        self._sizes = sizes
        self._pending: list[tuple[DecideInput, asyncio.Future[DecideOutput]]] = []
        self._timer: asyncio.Handle | None = None
        self._joined = _PAYS  # moving average of the calls in a batch that waited
        self._probe_at = 0.0  # while waiting does not pay: when one call tries it again
        self._probing = False

    async def decide(self, request: DecideInput) -> DecideOutput:
        loop = asyncio.get_running_loop()
        if not self._pending:
            if self._joined < _PAYS:
                if loop.time() < self._probe_at:
                    if self._sizes is not None:
                        self._sizes.observe(1)
                    return self._plane.decide(request)
                self._probing = True
        future: asyncio.Future[DecideOutput] = loop.create_future()
        self._pending.append((request, future))
        if len(self._pending) >= self._max_size:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self._max_wait_s, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = [(r, f) for r, f in self._pending if not f.done()]
        self._pending = []
        if self._probing:  # the probe's batch tells about the load now
            self._joined, self._probing = float(len(batch)), False
        else:
            self._joined = 0.8 * self._joined + 0.2 * len(batch)
        if self._joined < _PAYS:
            self._probe_at = asyncio.get_running_loop().time() + _PROBE_INTERVAL_S
        if not batch:
            return
        if self._sizes is not None:
            self._sizes.observe(len(batch))
        try:
            outputs = self._plane.decide_each([r for r, _ in batch])
        except Exception as e:  # not a row's error: every call of the batch gets it
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
            return
        for (_, future), out in zip(batch, outputs, strict=True):
            if future.done():
                continue
            if isinstance(out, Exception):
                future.set_exception(out)
            else:
                future.set_result(out)
