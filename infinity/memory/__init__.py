"""Host memory and (later) the tiered memory manager."""
from infinity.memory.host_buffer import HostBuffer, PagePolicy, PinPolicy

__all__ = ["HostBuffer", "PagePolicy", "PinPolicy"]
