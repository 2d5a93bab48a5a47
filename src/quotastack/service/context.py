"""Who is calling, in which environment, and what time it is for them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Ctx:
    tenant_id: str
    env_id: int
    environment: str  # "sandbox" or "live"
    key_id: str | None
    scopes: frozenset[str]
    now_us: int  # the environment's clock: real time, plus the sandbox clock's advance
    request_id: str
    # The sandbox clock's advance ``now_us`` was read with (``now_us`` minus it is real time).
    clock_offset_us: int = 0

    def at(self, now_us: int) -> "Ctx":
        return Ctx(self.tenant_id, self.env_id, self.environment, self.key_id, self.scopes, now_us,
                   self.request_id, self.clock_offset_us)
