"""Memory amounts."""

from pydantic import BaseModel, ConfigDict, Field

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


class Memory(BaseModel):
    """An amount of memory in bytes, with readable constructors and formatting."""

    model_config = ConfigDict(frozen=True)

    in_bytes: int = Field(ge=0)

    @classmethod
    def from_bytes(cls, value: int) -> "Memory":
        return cls(in_bytes=value)

    @classmethod
    def from_mb(cls, value: float) -> "Memory":
        return cls(in_bytes=int(value * MIB))

    @classmethod
    def from_gb(cls, value: float) -> "Memory":
        return cls(in_bytes=int(value * GIB))

    @property
    def in_mb(self) -> float:
        return self.in_bytes / MIB

    @property
    def in_gb(self) -> float:
        return self.in_bytes / GIB

    def __add__(self, other: "Memory") -> "Memory":
        return Memory(in_bytes=self.in_bytes + other.in_bytes)

    def __str__(self) -> str:
        return format_bytes(self.in_bytes)


def format_bytes(value: int) -> str:
    """Human-readable size, e.g. ``4.50 GiB``."""
    if value >= GIB:
        return f"{value / GIB:.2f} GiB"
    if value >= MIB:
        return f"{value / MIB:.1f} MiB"
    return f"{value} B"
