"""Generate from the command line, in this process or over a local N-rank pipeline.

uv run python -m exo.worker.runner.generate --prompt "What is the capital of France?"
uv run python -m exo.worker.runner.generate --prompt "..." --world-size 2
uv run python -m exo.worker.runner.generate --prompt "..." --world-size 2 --devices cuda:0,cpu:0
uv run python -m exo.worker.runner.generate --prompt "A cat as JSON" --json --frequency-penalty 1

In one process the model runs on ``--device`` (default: the first GPU MLX reaches, else
the CPU); a pipeline's ranks run on ``--devices``, one per rank.
"""

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from exo.models.locate import model_directory
from exo.models.weights_cache import default_weights_cache
from exo.shared.types.generation import GenerationChunk, GenerationRequest
from exo.worker.compute_device import DeviceUnavailableError, use_compute_device
from exo.worker.runner.launch import LocalPipelineRun, stream_local_pipeline

if TYPE_CHECKING:
    from exo.worker.runner.engine import Engine


def load_local_engine(model_path: Path | None = None) -> "Engine":
    """The whole model in this process (on MLX's default device), ready to generate."""
    from exo.models.stage import load_stage
    from exo.models.tokenizer import load_model_tokenizer
    from exo.worker.runner.engine import Engine, LocalStepper

    directory = model_directory(model_path, default_weights_cache())
    return Engine(load_model_tokenizer(directory), LocalStepper(load_stage(directory)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate text with the bundled model.")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--system", help="a system message (chat mode)")
    parser.add_argument("--raw", action="store_true", help="no chat template")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[])
    parser.add_argument("--presence-penalty", type=float, default=0.0)
    parser.add_argument("--frequency-penalty", type=float, default=0.0)
    parser.add_argument("--json", action="store_true", help="constrain the output to JSON")
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument(
        "--layer-split",
        help="pipeline layer ranges, e.g. 0:10,10:30 (default: even split)",
    )
    parser.add_argument("--model", type=Path)
    parser.add_argument("--device", help="one process: compute on this device (e.g. cuda:0)")
    parser.add_argument("--devices", help="a pipeline: one device per rank, e.g. cuda:0,cpu:0")
    arguments = parser.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")

    messages: list[dict[str, str]] | None = None
    if not arguments.raw:
        messages = []
        if arguments.system:
            messages.append({"role": "system", "content": arguments.system})
        messages.append({"role": "user", "content": arguments.prompt})
    request = GenerationRequest(
        messages=messages,
        prompt=arguments.prompt if arguments.raw else None,
        max_tokens=arguments.max_tokens,
        temperature=arguments.temperature,
        top_p=arguments.top_p,
        seed=arguments.seed,
        stop=arguments.stop,
        presence_penalty=arguments.presence_penalty,
        frequency_penalty=arguments.frequency_penalty,
        response_format="json_object" if arguments.json else "text",
    )
    started = time.perf_counter()
    chunks: Iterator[GenerationChunk]
    run = LocalPipelineRun()
    if arguments.world_size == 1:
        try:
            use_compute_device(arguments.device)
        except DeviceUnavailableError as error:
            print(f"generate: {error}", file=sys.stderr)
            return 2
        chunks = load_local_engine(arguments.model).generate(request)
    else:
        layer_ranges = (
            [_layer_range(part) for part in arguments.layer_split.split(",")]
            if arguments.layer_split
            else None
        )
        devices: list[str | None] | None = (
            [device or None for device in arguments.devices.split(",")]
            if arguments.devices
            else None
        )
        chunks = stream_local_pipeline(
            arguments.world_size, request, layer_ranges, arguments.model, devices, run=run
        )
    first_token_at: float | None = None
    last: GenerationChunk | None = None
    for chunk in chunks:
        if first_token_at is None:
            first_token_at = time.perf_counter()
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        last = chunk
    finished = time.perf_counter()
    sys.stdout.write("\n")
    if last is None or first_token_at is None:
        failed = [s for s in run.statuses if s.status == "failed"]
        reasons = [f"rank {s.rank}: {s.error}" for s in failed] + run.failures
        print("no output" + (": " + "; ".join(reasons) if reasons else ""), file=sys.stderr)
        return 1
    decode_tokens = max(last.completion_tokens - 1, 0)
    decode_s = finished - first_token_at
    print(
        f"[{last.finish_reason}] prompt {last.prompt_tokens} tokens, completion "
        f"{last.completion_tokens} tokens; first token after {first_token_at - started:.2f} s"
        f" (incl. load), decode {decode_tokens / decode_s if decode_s > 0 else 0:.1f} tok/s",
        file=sys.stderr,
    )
    for status in run.statuses:
        if status.status == "connecting":
            print(
                f"rank {status.rank}: layers [{status.layer_start}, {status.layer_end}) on "
                f"{status.compute_device.device_id if status.compute_device else '?'}, "
                f"weights {(status.weight_bytes or 0) / 1e6:.1f} MB, "
                f"RSS after load {(status.rss_bytes or 0) / 1e6:.1f} MB",
                file=sys.stderr,
            )
    return 0


def _layer_range(text: str) -> tuple[int, int]:
    start, _, end = text.partition(":")
    return int(start), int(end)


if __name__ == "__main__":
    sys.exit(main())
