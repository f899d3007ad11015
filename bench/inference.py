"""Inference: exo's engine against mlx-lm's own generation, idle ranks, memory per rank,
and the whole stack on 1-, 2- and 3-node clusters.

Every ratio is against a baseline measured in the same run on the same machine:

1. **Engine vs mlx-lm** on the same weights (the bundled SmolLM2, imported) and device:
   mlx-lm's ``stream_generate`` in this process, exo's engine in this process
   (``LocalStepper``), and exo's engine as a 2-rank pipeline of runner processes; greedy,
   ``--max-tokens`` new tokens, ``--repeats`` rounds that each run all three (the order
   rotating). Time to first token (TTFT) and decode tokens/s after it, and the ratio to
   mlx-lm's run of the same round (this VM's speed drifts between rounds; a ratio within a
   round cancels the drift), median and range (decode: higher is better). Also
   the host time one decode step spends building MLX's graph, for mlx-lm's model and
   exo's stage: on a GPU, where a small model's kernels take less, it bounds tokens/s.
2. **Idle ranks**: a 3-rank pipeline after serving a request, each rank's CPU over
   ``--idle-seconds`` as a share of one core.
3. **Memory per rank**: a small qwen3 (12 layers of 22.5 MiB, bfloat16, random weights) built
   here, on 1, 2 and 3 ranks: each rank's weights and peak RSS (VmHWM) against its share of
   layers; what is left besides the weights is the interpreter, MLX, mlx-lm and (in a
   pipeline) the ring backend's buffers, the same on every rank.
4. **Cluster**: real nodes on loopback place the bundled model
   with ``min_nodes`` 1, 2, 3; streamed chat requests through the API.

All ranks share this machine's cores, so pipelines show their overhead, not a speed-up.

    uv run python bench/inference.py [--parts 1,2,3,4] [--max-tokens 64] [--repeats 5]
                                     [--device cpu:0]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import StreamTiming, timed
from exo.models.bundled import bundled_gguf_path
from exo.models.weights_cache import default_weights_cache, ensure_imported
from exo.shared.types.generation import GenerationChunk, GenerationRequest
from exo.worker.runner.launch import LocalPipeline
from tests.cluster import ExoNode, converged, running_cluster, wait_until

MODEL = "SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "Write a short story about a dragon who learns to fly."}]


def chunk_tokens(chunks: Iterator[GenerationChunk]) -> Iterator[int]:
    for chunk in chunks:
        yield len(chunk.token_ids)


def median_timing(runs: list[StreamTiming]) -> tuple[float, float]:
    """Median time to first token and median decode rate."""
    return statistics.median(r.ttft_s for r in runs), statistics.median(
        r.tokens_per_s for r in runs
    )


def graph_build_us(
    model: Callable[..., Any], new_cache: Callable[[], Any], steps: int = 50
) -> float:
    """Median microseconds a decode step spends in Python building MLX's graph (the
    per-token host work that bounds a small model on a GPU), nothing evaluated."""
    import mlx.core as mx

    token = mx.array([[100]])
    samples: list[float] = []
    for _ in range(steps):
        cache = new_cache()
        started = time.perf_counter()
        model(token, cache=cache)
        samples.append((time.perf_counter() - started) * 1e6)
    return statistics.median(samples)


def engine_versus_mlx_lm(max_tokens: int, repeats: int, device: str | None) -> None:
    from exo.worker.compute_device import use_compute_device

    used = use_compute_device(device)  # before mlx-lm makes its stream on the default device
    from mlx_lm.generate import stream_generate
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load

    from exo.worker.runner.generate import load_local_engine

    directory = ensure_imported(bundled_gguf_path(), default_weights_cache())
    model, tokenizer = load(str(directory))[:2]
    engine = load_local_engine(directory)
    stage = engine.stepper.stage  # pyright: ignore[reportAttributeAccessIssue]
    request = GenerationRequest(messages=MESSAGES, max_tokens=max_tokens)
    prompt = engine.prompt_ids(request)

    def mlx_lm_run() -> StreamTiming:
        responses = stream_generate(model, tokenizer, prompt, max_tokens=max_tokens)
        return timed(1 for _ in responses)

    def engine_run() -> StreamTiming:
        return timed(chunk_tokens(engine.generate(request)))

    with LocalPipeline(2, devices=[device, device]) as pipeline:
        pipeline.wait_ready()  # its ranks sleep while the others run (no busy waiting)

        def two_ranks_run() -> StreamTiming:
            return timed(chunk_tokens(pipeline.generate(request)))

        arms: list[tuple[str, Callable[[], StreamTiming]]] = [
            ("mlx-lm", mlx_lm_run),
            ("engine, 1 process", engine_run),
            ("engine, 2 ranks", two_ranks_run),
        ]
        rows: dict[str, list[StreamTiming]] = {name: [] for name, _ in arms}
        for _, run in arms:  # warm-up: kernels, caches
            run()
        for repeat in range(repeats):  # every arm in each round, starting with another
            for name, run in arms[repeat % 3 :] + arms[: repeat % 3]:
                rows[name].append(run())
    host_us = {
        "mlx-lm model": graph_build_us(model, lambda: make_prompt_cache(model)),
        "engine stage": graph_build_us(stage, stage.make_cache),
    }
    print(
        f"\n1. engine vs mlx-lm ({MODEL}, {len(prompt)}-token prompt, {max_tokens} new tokens, "
        f"{used.device_id} {used.name}, {repeats} rounds)"
    )
    print(
        f"{'':<20} {'TTFT ms':>9} {'tok/s':>8}   ratios to mlx-lm in the same round, "
        "median (min-max): TTFT, tok/s"
    )
    for name, runs in rows.items():
        ttft, rate = median_timing(runs)
        ttft_ratios = [r.ttft_s / b.ttft_s for r, b in zip(runs, rows["mlx-lm"], strict=True)]
        rate_ratios = [
            r.tokens_per_s / b.tokens_per_s for r, b in zip(runs, rows["mlx-lm"], strict=True)
        ]
        print(
            f"{name:<20} {ttft * 1000:9.0f} {rate:8.2f}   {spread(ttft_ratios)}, "
            f"{spread(rate_ratios)}"
        )
    print(
        "host time to build one decode step (no evaluation): "
        + ", ".join(f"{name} {micros:.0f} us" for name, micros in host_us.items())
    )


def spread(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def idle_ranks(seconds: float) -> None:
    with LocalPipeline(3) as pipeline:
        pipeline.wait_ready()
        request = GenerationRequest(messages=MESSAGES, max_tokens=8)
        for _ in pipeline.generate(request):
            pass
        time.sleep(1.0)
        processes = [psutil.Process(process.pid) for process in pipeline.processes]

        def cpu() -> list[float]:
            return [p.cpu_times().user + p.cpu_times().system for p in processes]

        before = cpu()
        time.sleep(seconds)
        after = cpu()
    print(f"\n2. idle ranks: a 3-rank pipeline after a request, CPU over {seconds:.0f} s")
    for rank, (start, end) in enumerate(zip(before, after, strict=True)):
        print(f"rank {rank}: {100 * (end - start) / seconds:5.2f} % of a core")


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return psutil.Process(pid).memory_info().rss


SMALL_QWEN3: dict[str, Any] = {
    "model_type": "qwen3",
    "hidden_size": 1024,
    "num_hidden_layers": 12,
    "intermediate_size": 2816,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "rms_norm_eps": 1e-6,
    "vocab_size": 288,
    "max_position_embeddings": 2048,
    "rope_theta": 1_000_000.0,
    "tie_word_embeddings": True,
}


def build_small_qwen3(directory: Path) -> Path:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes  # pyright: ignore[reportPrivateUsage]

    from exo.models.tests.tiny_models import write_tokenizer

    model_class, args_class = _get_classes(SMALL_QWEN3)
    model: nn.Module = model_class(args_class.from_dict(SMALL_QWEN3))
    model.set_dtype(mx.bfloat16)
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    directory.mkdir(parents=True)
    mx.save_safetensors(str(directory / "model.safetensors"), weights)
    (directory / "config.json").write_text(json.dumps(SMALL_QWEN3))
    write_tokenizer(directory)
    return directory


def memory_per_rank() -> None:
    from exo.models.directory import card_from_directory

    with tempfile.TemporaryDirectory() as scratch:
        directory = build_small_qwen3(Path(scratch) / "small-qwen3")
        card = card_from_directory(directory)
        total = card.total_bytes
        print(
            f"\n3. memory per rank: qwen3, {card.n_layers} layers × {card.layer_bytes / 2**20:.1f}"
            f" MiB + {card.non_layer_bytes / 2**20:.1f} MiB embedding (tied head), bfloat16"
        )
        print(
            f"{'ranks':<6} {'rank':>4} {'layers':>8} {'share':>6} {'weights MiB':>12} "
            f"{'of model':>9} {'peak RSS MiB':>13}"
        )
        request = GenerationRequest(prompt="a short prompt", max_tokens=4)
        for world_size in (1, 2, 3):
            with LocalPipeline(world_size, model_path=directory) as pipeline:
                pipeline.wait_ready()
                for _ in pipeline.generate(request):
                    pass
                peaks = [peak_rss_bytes(process.pid) for process in pipeline.processes]
                ready = {s.rank: s for s in pipeline.statuses if s.status == "ready"}
            for rank in range(world_size):
                start, end = pipeline.layer_ranges[rank]
                weights = ready[rank].weight_bytes or 0
                print(
                    f"{world_size:<6} {rank:>4} {f'{start}-{end}':>8} "
                    f"{(end - start) / card.n_layers:6.2f} {weights / 2**20:12.1f} "
                    f"{weights / total:9.2f} {peaks[rank] / 2**20:13.1f} "
                    f"{(peaks[rank] - weights) / 2**20:14.1f}"
                )


def stream_over_api(node: ExoNode, max_tokens: int) -> StreamTiming:
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
    }

    def frames() -> Iterator[int]:
        with httpx.stream(
            "POST", node.url + "/v1/chat/completions", json=body, timeout=300.0
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    frame = json.loads(line[len("data: ") :])
                    if frame.get("usage"):
                        continue
                    yield 1 if frame["choices"][0]["delta"].get("content") else 0

    return timed(frames())


def cluster_runner_peaks(nodes: list[ExoNode]) -> dict[str, int]:
    peaks: dict[str, int] = {}
    for node in nodes:
        assert node.process is not None
        for child in psutil.Process(node.process.pid).children(recursive=True):
            command = child.cmdline()
            if "exo.worker.runner.process" not in " ".join(command):
                continue
            rank = command[command.index("--rank") + 1]
            start = command[command.index("--layer-start") + 1]
            end = command[command.index("--layer-end") + 1]
            peaks[f"rank {rank} layers {start}-{end}"] = peak_rss_bytes(child.pid)
    return peaks


def cluster(max_tokens: int, repeats: int) -> None:
    rows: dict[int, dict[str, Any]] = {}
    for world_size in (1, 2, 3):
        with (
            tempfile.TemporaryDirectory() as directory,
            running_cluster(Path(directory), world_size) as nodes,
        ):
            wait_until(
                lambda nodes=nodes, size=world_size: converged(nodes, size),
                15.0,
                "the cluster to converge",
            )
            created = httpx.post(
                nodes[0].url + "/instance",
                json={"model_id": MODEL, "min_nodes": world_size},
                timeout=60.0,
            )
            assert created.status_code == 201, created.text
            shards = created.json()["shards"]

            def ready(nodes: list[ExoNode] = nodes, shards: Any = shards) -> bool:
                runners = nodes[0].state()["runners"]
                return all(runners.get(s["runner_id"], {}).get("status") == "ready" for s in shards)

            load_s = wait_until(ready, 180.0, "runners to be ready")
            stream_over_api(nodes[0], 8)  # warm-up
            timings = [stream_over_api(nodes[0], max_tokens) for _ in range(repeats)]
            rows[world_size] = {
                "load_s": load_s,
                "timing": median_timing(timings),
                "peaks": cluster_runner_peaks(nodes),
            }
    base = rows[1]["timing"]
    print(f"\n4. cluster ({MODEL} through the API, streamed, {max_tokens} new tokens)")
    print(f"{'layout':<8} {'load s':>7} {'TTFT ms':>9} {'tok/s':>7} {'TTFT x':>7} {'tok/s x':>8}")
    for world_size, row in rows.items():
        ttft, rate = row["timing"]
        print(
            f"{world_size}-node   {row['load_s']:7.1f} {ttft * 1000:9.0f} {rate:7.2f} "
            f"{ttft / base[0]:7.2f} {rate / base[1]:8.2f}"
        )
    print("peak RSS per runner (VmHWM):")
    for world_size, row in rows.items():
        for name, peak in sorted(row["peaks"].items()):
            print(f"  {world_size}-node {name:<22} {peak / 2**20:7.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--device", help="compute device for part 1 (default: the best here)")
    parser.add_argument("--parts", default="1,2,3,4", help="which parts to run, e.g. 1,3")
    args = parser.parse_args()
    parts: dict[str, Callable[[], None]] = {
        "1": lambda: engine_versus_mlx_lm(args.max_tokens, args.repeats, args.device),
        "2": lambda: idle_ranks(args.idle_seconds),
        "3": memory_per_rank,
        "4": lambda: cluster(args.max_tokens, args.repeats),
    }
    for name in args.parts.split(","):
        parts[name.strip()]()
        sys.stdout.flush()


if __name__ == "__main__":
    main()
