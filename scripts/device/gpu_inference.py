"""Models on the GPU they are placed on: the checks for an NVIDIA machine (issue 8).

Run by ``scripts/device/gpu_inference.sh`` there (see scripts/device/README.md); it also
runs anywhere MLX does, e.g. ``uv run python scripts/device/gpu_inference.py --device cpu:0``
to check the script itself on a CPU. With the bundled SmolLM2 (imported by the .sh), it
prints:

0. what MLX on the machine computes on (the node's execution probe);
1. exo's engine on ``--device``: decode tokens/s and time to first token, with the GPU's
   utilisation and memory read through exo's own CUDA backend (NVML) while it runs;
2. mlx-lm's own generation on the same device and weights, and engine / mlx-lm;
3. a 2-rank pipeline with both ranks on the device, against the single process;
4. a pipeline of one rank on the device and one on the CPU (a mixed pipeline over the MLX
   ring): the same greedy text as one process;

then the goals: >= 400 tokens/s decode, >= 0.9x mlx-lm, 2 ranks >= 0.5x one process.
"""

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import anyio

from bench.timing import StreamTiming, timed
from exo.models.weights_cache import default_weights_cache
from exo.shared.types.generation import GenerationRequest
from exo.shared.types.ids import DeviceId, NodeId
from exo.worker.compute_device import use_compute_device
from exo.worker.execution_probe import probe_execution
from exo.worker.runner.launch import LocalPipeline

LONG = [{"role": "user", "content": "Write a long, detailed story about a lighthouse keeper."}]
SHORT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


class NVMLSampler:
    """Samples one GPU through exo's CUDA backend every ``interval_s`` while it runs."""

    def __init__(self, device_id: str, interval_s: float = 0.1) -> None:
        self.device_id = DeviceId(device_id)
        self.interval_s = interval_s
        self.readings: list[tuple[float, int]] = []  # (utilisation %, memory used bytes)
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: anyio.run(self._run), daemon=True)

    async def _run(self) -> None:
        from exo.gpu.backends.cuda import CUDABackend

        backend = CUDABackend()
        try:
            await backend.initialize()
            while not self._stop.is_set():
                state = await backend.sample(NodeId("check"), self.device_id)
                self.readings.append((state.compute_utilization_percent, state.memory_used_bytes))
                await anyio.sleep(self.interval_s)
        except Exception as error:  # no NVML here (a CPU run): say so, measure the rest
            self.error = f"{type(error).__name__}: {error}"
        finally:
            await backend.shutdown()

    def __enter__(self) -> "NVMLSampler":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def summary(self) -> str:
        if not self.readings:
            return f"NVML not read ({self.error or 'no readings'})"
        utilisation = [reading[0] for reading in self.readings]
        memory = [reading[1] for reading in self.readings]
        return (
            f"NVML over {len(self.readings)} readings: utilisation mean "
            f"{statistics.mean(utilisation):.1f} %, max {max(utilisation):.0f} %; memory used "
            f"{min(memory) / 2**20:.0f} to {max(memory) / 2**20:.0f} MiB"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description="GPU inference checks (issue 8).")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--cpu-device", default="cpu:0")
    parser.add_argument("--max-tokens", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--model", type=Path, help="GGUF file or MLX model directory (default: the bundled one)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results: dict[str, Any] = {}

    capability = probe_execution()
    print(f"0. execution probe: {capability.model_dump_json()}", flush=True)
    results["execution"] = capability.model_dump(mode="json")

    device = use_compute_device(args.device)  # before mlx-lm makes a stream on the default
    print(f"   this process computes on {device.device_id} ({device.name})", flush=True)
    from mlx_lm.generate import stream_generate
    from mlx_lm.utils import load

    from exo.models.locate import model_directory
    from exo.worker.runner.generate import load_local_engine

    directory = model_directory(args.model, default_weights_cache())
    started = time.perf_counter()
    engine = load_local_engine(directory)
    long_request = GenerationRequest(messages=LONG, max_tokens=args.max_tokens)
    prompt = engine.prompt_ids(long_request)
    first = timed(len(c.token_ids) for c in engine.generate(long_request))
    print(f"   first load and generation: {time.perf_counter() - started:.1f} s", flush=True)
    results["first_run"] = first._asdict()

    model, tokenizer = load(str(directory))[:2]
    engine_runs: list[StreamTiming] = []
    mlx_lm_runs: list[StreamTiming] = []
    with NVMLSampler(args.device) as sampler:
        for _ in range(args.repeats):  # interleaved
            engine_runs.append(timed(len(c.token_ids) for c in engine.generate(long_request)))
            responses = stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens)
            mlx_lm_runs.append(timed(1 for _ in responses))
    engine_ttft = statistics.median(run.ttft_s for run in engine_runs)
    engine_rate = statistics.median(run.tokens_per_s for run in engine_runs)
    mlx_lm_ttft = statistics.median(run.ttft_s for run in mlx_lm_runs)
    mlx_lm_rate = statistics.median(run.tokens_per_s for run in mlx_lm_runs)
    print(
        f"1. engine on {device.device_id}: {engine_rate:.1f} tokens/s decode over "
        f"{engine_runs[0].tokens} tokens, first token {engine_ttft * 1000:.0f} ms; "
        f"{sampler.summary()}",
        flush=True,
    )
    print(
        f"2. mlx-lm on {device.device_id}: {mlx_lm_rate:.1f} tokens/s, first token "
        f"{mlx_lm_ttft * 1000:.0f} ms; engine / mlx-lm: decode {engine_rate / mlx_lm_rate:.2f}x, "
        f"first token {engine_ttft / mlx_lm_ttft:.2f}x",
        flush=True,
    )
    results["engine"] = {"ttft_s": engine_ttft, "tokens_per_s": engine_rate}
    results["mlx_lm"] = {"ttft_s": mlx_lm_ttft, "tokens_per_s": mlx_lm_rate}
    results["nvml"] = {"readings": sampler.readings, "error": sampler.error}

    with LocalPipeline(2, model_path=directory, devices=[args.device, args.device]) as pipeline:
        pipeline.wait_ready(timeout_s=400)  # a first CUDA start compiles kernels
        timed(len(c.token_ids) for c in pipeline.generate(long_request))  # warm-up
        runs = [
            timed(len(c.token_ids) for c in pipeline.generate(long_request))
            for _ in range(args.repeats)
        ]
    two_rate = statistics.median(run.tokens_per_s for run in runs)
    print(
        f"3. 2 ranks on {args.device}: {two_rate:.1f} tokens/s, "
        f"{two_rate / engine_rate:.2f}x one process",
        flush=True,
    )
    results["two_ranks"] = {"tokens_per_s": two_rate}

    short = GenerationRequest(messages=SHORT, max_tokens=64)
    expected = engine.complete(short)
    mixed_devices: list[str | None] = [args.device, args.cpu_device]
    with LocalPipeline(2, model_path=directory, devices=mixed_devices) as pipeline:
        pipeline.wait_ready(timeout_s=400)
        computed = {s.rank: s.compute_device for s in pipeline.statuses if s.status == "ready"}
        text = "".join(chunk.text for chunk in pipeline.generate(short))
        mixed = timed(len(c.token_ids) for c in pipeline.generate(long_request))
    where = ", ".join(
        f"rank {rank} on {device.device_id if device else '?'}"
        for rank, device in sorted(computed.items())
    )
    same = text == expected.text
    print(
        f"4. mixed pipeline ({where}): same text as one process: {same} ({text!r}); "
        f"{mixed.tokens_per_s:.1f} tokens/s",
        flush=True,
    )
    results["mixed"] = {"same_text": same, "text": text, "tokens_per_s": mixed.tokens_per_s}

    goals = {
        "decode >= 400 tokens/s": engine_rate >= 400,
        "engine >= 0.9x mlx-lm": engine_rate >= 0.9 * mlx_lm_rate,
        "2 ranks >= 0.5x one process": two_rate >= 0.5 * engine_rate,
        "mixed pipeline gives one process's text": same,
    }
    for goal, met in goals.items():
        print(f"goal {goal}: {'met' if met else 'NOT met'}")
    results["goals"] = goals
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
