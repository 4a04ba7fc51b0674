"""The in-process tier: verified kernels, least recently used evicted first, bounded in bytes.

It holds :class:`Kernel` objects that were verified when they entered, so a hit costs a dict
lookup and no hashing (the 0.1 ms budget). The bound is on the kernels' file bytes, the memory that
actually grows with the number of kernels, not on the entry count.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from esper_core.compiler.artifact import Kernel


def kernel_bytes(kernel: Kernel) -> int:
    return sum(len(data) for data in kernel.files.values())


class MemoryTier:
    """A thread-safe LRU of kernels holding at most ``capacity`` bytes (0 keeps nothing)."""

    name = "memory"

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.bytes = 0
        self._entries: OrderedDict[str, Kernel] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, address: object) -> bool:
        return address in self._entries

    def addresses(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def get(self, address: str) -> Kernel | None:
        with self._lock:
            kernel = self._entries.get(address)
            if kernel is not None:
                self._entries.move_to_end(address)
            return kernel

    def put(self, kernel: Kernel) -> None:
        size = kernel_bytes(kernel)
        if size > self.capacity:
            return
        with self._lock:
            old = self._entries.pop(kernel.address, None)
            if old is not None:
                self.bytes -= kernel_bytes(old)
            self._entries[kernel.address] = kernel
            self.bytes += size
            while self.bytes > self.capacity:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= kernel_bytes(evicted)

    def evict(self, address: str) -> None:
        with self._lock:
            old = self._entries.pop(address, None)
            if old is not None:
                self.bytes -= kernel_bytes(old)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0
