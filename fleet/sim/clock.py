"""Simulated time: the latency model and the simulator's background work.

Every duration an object simulates (a clone, a power-on, a guest boot) is a
base figure from the topology's ``[latency]`` table, jittered and multiplied by
the time scale (0 makes the simulator instant, for tests). Work that outlives
the call that started it (a task's body, a guest process, a boot timer) is
spawned here, so closing the simulator stops all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any


class Clock:
    """Latency (jittered, scaled), sleeps, timers and background tasks, and vCenter's
    wall clock."""

    def __init__(self, rng: random.Random, *, time_scale: float, jitter: float) -> None:
        self.rng = rng
        self.time_scale = time_scale
        self.jitter = jitter
        #: vCenter's wall clock is the local one plus this: a vCenter whose clock is not
        #: its clients' (``ServiceInstance.CurrentTime``); the fleet lock must not care
        self.offset_s = 0.0
        self._background: set[asyncio.Task[Any]] = set()

    def now(self) -> datetime:
        """vCenter's wall clock."""
        return datetime.now(UTC) + timedelta(seconds=self.offset_s)

    def latency(self, base_s: float) -> float:
        """Simulated duration of ``base_s`` (time scale 1): jittered and scaled."""
        if base_s <= 0:
            return 0.0
        jitter = self.jitter
        factor = 1.0 + (self.rng.uniform(-jitter, jitter) if jitter else 0.0)
        return base_s * factor * self.time_scale

    async def sleep(self, base_s: float) -> None:
        delay = self.latency(base_s)
        if delay > 0:
            await asyncio.sleep(delay)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def later(self, delay_s: float, fn: Callable[[], None]) -> None:
        asyncio.get_running_loop().call_later(max(0.0, delay_s), fn)

    async def close(self) -> None:
        """Cancel the background work and wait for it to end."""
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(BaseException):
                await task
