"""The runner process's command line, defined once: :class:`RunnerArguments` builds it
(``argv()``, ``command()``) for whoever starts a runner (the worker's supervisor, the local
pipeline launcher) and parses it (``parse()``) in the runner itself.

Every field is one ``--flag value`` pair named after the field (``layer_start`` is
``--layer-start``); a field left at None is left out. Nested models travel as JSON.
"""

import sys
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from exo.shared.types.generation import GenerationRequest

RUNNER_MODULE = "exo.worker.runner.process"


class RunnerArgumentsError(ValueError):
    """A runner command line that does not parse; the message is one sentence."""


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


class RunnerArguments(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    rank: int = Field(default=0, ge=0, description="this process's rank in the instance")
    world_size: int = Field(default=1, ge=1, description="ranks in the instance")
    hostfile: Path | None = Field(
        default=None, description="JSON ring hostfile (MLX_HOSTFILE format); pipelines only"
    )
    layer_start: int = Field(default=0, ge=0, description="first layer this rank runs")
    layer_end: int | None = Field(
        default=None, gt=0, description="end of this rank's layers, exclusive (default: last)"
    )
    device: str | None = Field(
        default=None,
        pattern=r"^(cpu|cuda|metal):\d+$",
        description="compute on this device only: cuda:N (NVML's number), metal:0 or cpu:0 "
        "(default: the first GPU MLX reaches here, else the CPU)",
    )
    model: Path | None = Field(
        default=None,
        description="MLX model directory or GGUF file (default: the bundled SmolLM2)",
    )
    weights_cache: Path | None = Field(
        default=None, description="where GGUF files are imported (default: $EXO_HOME/weights)"
    )
    request: GenerationRequest | None = Field(
        default=None, description="rank 0: run this one request (JSON), then stop"
    )

    @field_validator("request", mode="before")
    @classmethod
    def _request_from_json(cls, value: object) -> object:
        if isinstance(value, str):
            return GenerationRequest.model_validate_json(value)
        return value

    def argv(self) -> list[str]:
        """The flags, in field order; None values left out."""
        result: list[str] = []
        for name in type(self).model_fields:
            value: Any = getattr(self, name)
            if value is None:
                continue
            text = value.model_dump_json() if isinstance(value, BaseModel) else str(value)
            result += [_flag(name), text]
        return result

    def command(self) -> list[str]:
        """The whole command: this interpreter running the runner module with :meth:`argv`."""
        return [sys.executable, "-m", RUNNER_MODULE, *self.argv()]

    @classmethod
    def parse(cls, argv: list[str]) -> Self:
        """The inverse of :meth:`argv`; raises :class:`RunnerArgumentsError`."""
        flags = {_flag(name): name for name in cls.model_fields}
        values: dict[str, str] = {}
        index = 0
        while index < len(argv):
            flag = argv[index]
            if flag not in flags:
                raise RunnerArgumentsError(f"unknown runner option {flag!r}")
            if index + 1 >= len(argv):
                raise RunnerArgumentsError(f"runner option {flag} needs a value")
            values[flags[flag]] = argv[index + 1]
            index += 2
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            detail = error.errors()[0]
            where = _flag(str(detail["loc"][0])) if detail["loc"] else "the arguments"
            raise RunnerArgumentsError(f"runner option {where}: {detail['msg']}") from error

    @classmethod
    def usage(cls) -> str:
        lines = [f"usage: python -m {RUNNER_MODULE} [options]", "", "options:"]
        for name, field in cls.model_fields.items():
            lines.append(f"  {_flag(name):<18} {field.description or ''}")
        return "\n".join(lines)
