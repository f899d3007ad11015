"""Real multi-process pipelines over MLX's ring backend on 127.0.0.1, compared with the
same request run in one process."""

import json
import subprocess
import threading
import time
from pathlib import Path

import mlx.core as mx
import psutil
import pytest

from exo.models.tests.tiny_models import FAMILY_CONFIGS
from exo.shared.types.generation import GenerationChunk, GenerationRequest, SamplingParams
from exo.worker.runner.engine import Engine, LocalStepper
from exo.worker.runner.generate import load_local_engine
from exo.worker.runner.hostfile import read_hostfile, write_hostfile
from exo.worker.runner.launch import (
    LocalPipeline,
    LocalPipelineRun,
    free_loopback_ports,
    rank_command,
    rank_environment,
    run_local_pipeline,
    split_layers,
)
from exo.worker.runner.messages import (
    ChunkOutput,
    GenerateInput,
    RunnerOutputMessage,
    StatusOutput,
    parse_output,
)
from exo.worker.runner.pipeline import COMMAND_FORWARD, Header
from exo.worker.runner.timing import MIN_DECODE_TOKENS

GREEDY = GenerationRequest(
    request_id="greedy",
    messages=[{"role": "user", "content": "Name three colours of the rainbow."}],
    max_tokens=16,
)


@pytest.fixture(scope="module")
def greedy_expected(engine: Engine) -> GenerationChunk:
    return engine.complete(GREEDY)


def _assert_clean(run: LocalPipelineRun) -> None:
    assert run.return_codes == [0] * len(run.return_codes), run.stderr
    assert run.final is not None, run.stderr


def test_split_layers() -> None:
    assert split_layers(30, 1) == [(0, 30)]
    assert split_layers(30, 2) == [(0, 15), (15, 30)]
    assert split_layers(30, 4) == [(0, 8), (8, 16), (16, 23), (23, 30)]
    with pytest.raises(ValueError):
        split_layers(3, 4)


def test_header_round_trip() -> None:
    sampling = SamplingParams(
        temperature=0.7, top_p=0.9, seed=2**40 + 3, frequency_penalty=1.5, json_object=True
    )
    header = Header(COMMAND_FORWARD, 37, mx.bfloat16, 576, sampling)
    decoded = Header.decode(header.encode())
    assert (decoded.command, decoded.length, decoded.hidden_size) == (COMMAND_FORWARD, 37, 576)
    assert decoded.dtype == mx.bfloat16
    assert decoded.sampling == sampling


def test_hostfile_format(tmp_path: Path) -> None:
    path = write_hostfile(tmp_path / "hosts.json", ["127.0.0.1:5000", "127.0.0.1:5001"])
    # The format MLX's ring backend reads: one list of "ip:port" per rank.
    assert json.loads(path.read_text()) == [["127.0.0.1:5000"], ["127.0.0.1:5001"]]
    assert read_hostfile(path) == [["127.0.0.1:5000"], ["127.0.0.1:5001"]]


def test_two_ranks_match_one_process_greedy(
    engine: Engine, greedy_expected: GenerationChunk
) -> None:
    expected = greedy_expected
    run = run_local_pipeline(2, GREEDY, warm_up=True)  # the second request is reported
    _assert_clean(run)
    assert run.token_ids == expected.token_ids
    assert run.text == expected.text
    assert run.final is not None and run.final.finish_reason == expected.finish_reason
    assert run.final.prompt_tokens == expected.prompt_tokens
    assert run.final.completion_tokens == expected.completion_tokens
    # Each rank reported holding only its share of the weights.
    ready = [s for s in run.statuses if s.status == "ready"]
    assert {s.rank for s in ready} == {0, 1}
    assert isinstance(engine.stepper, LocalStepper)
    full_bytes = engine.stepper.stage.nbytes
    for status in ready:
        assert status.weight_bytes is not None and status.weight_bytes < 0.7 * full_bytes
    assert {s.status for s in run.statuses if s.rank == 1} >= {
        "loading",
        "connecting",
        "ready",
        "shut_down",
    }
    # Each rank measured its own stage per decode token; rank 0 also end to end.
    decode_tokens = expected.completion_tokens - 1
    assert decode_tokens >= MIN_DECODE_TOKENS
    by_rank = {report.rank: report for report in run.stage_times}
    assert sorted(by_rank) == [0, 1] and len(run.stage_times) == 2, run.stage_times
    assert all(report.stage_ms_per_token > 0 for report in run.stage_times)
    assert all(report.tokens == decode_tokens for report in run.stage_times)
    rank_zero = by_rank[0]
    assert rank_zero.ms_per_token is not None and rank_zero.time_to_first_token_ms is not None
    # End to end a token passes through both stages: longer than rank 0's stage alone.
    assert rank_zero.ms_per_token > rank_zero.stage_ms_per_token
    assert rank_zero.time_to_first_token_ms > 0
    assert by_rank[1].ms_per_token is None and by_rank[1].time_to_first_token_ms is None


def test_sampling_penalties_json_and_logprobs_on_the_last_rank_match_one_process(
    engine: Engine,
) -> None:
    """The last rank samples with the request's temperature, top-p and seed, and with its
    penalties and JSON constraint (it loads the tokenizer for it), and sends the
    log-probabilities back to rank 0: two requests on one pipeline."""
    sampled = GenerationRequest(
        request_id="sampled",
        prompt="The best thing about summer is",
        max_tokens=12,
        temperature=0.9,
        top_p=0.95,
        seed=1234,
    )
    constrained = GenerationRequest(
        request_id="constrained",
        messages=[{"role": "user", "content": "Describe a cat as JSON."}],
        max_tokens=10,
        temperature=0.8,
        seed=99,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logprobs=True,
        top_logprobs=2,
        response_format="json_object",
    )
    with LocalPipeline(2) as pipeline:
        pipeline.wait_ready()
        for request in (sampled, constrained):
            expected = engine.complete(request)
            chunks = list(pipeline.generate(request))
            assert [token for chunk in chunks for token in chunk.token_ids] == expected.token_ids
            assert "".join(chunk.text for chunk in chunks) == expected.text
        json.loads(expected.text)
        logprobs = [entry for chunk in chunks for entry in chunk.logprobs or []]
        assert expected.logprobs is not None and len(logprobs) == len(expected.logprobs) > 0
        for got, want in zip(logprobs, expected.logprobs, strict=True):
            assert got.token == want.token
            assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
            assert [top.token for top in got.top_logprobs] == [
                top.token for top in want.top_logprobs
            ]
    assert pipeline.return_codes == [0, 0]


def test_layer_ranges_that_do_not_chain_fail_clearly() -> None:
    run = run_local_pipeline(2, GREEDY, layer_ranges=[(0, 10), (12, 30)], timeout_s=60)
    assert run.return_codes[0] != 0 and run.return_codes[1] != 0
    failed = [s for s in run.statuses if s.status == "failed"]
    assert failed, run.stderr
    assert any("starts at layer 12" in (s.error or "") for s in failed)
    assert run.chunks == []


def test_rank_zero_fails_instead_of_hanging_when_its_neighbour_dies(tmp_path: Path) -> None:
    # Rank 0 waits for the last rank's token on the control channel; the dead rank's closed
    # connection ends that wait with a failed status rather than a hang.
    hostfile = write_hostfile(
        tmp_path / "hosts.json", [f"127.0.0.1:{port}" for port in free_loopback_ports(2)]
    )
    ranges = split_layers(30, 2)
    processes = [
        subprocess.Popen(
            rank_command(rank, 2, hostfile, ranges[rank]),
            env=rank_environment(rank, hostfile),
            stdin=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for rank in range(2)
    ]
    # Without the fix rank 0 blocks; never let that hang the test run.
    watchdog = threading.Timer(60, lambda: [process.kill() for process in processes])
    watchdog.start()
    try:
        rank_zero = processes[0]
        assert rank_zero.stdin is not None and rank_zero.stdout is not None
        long_request = GenerationRequest(
            request_id="long", prompt="Once upon a time", max_tokens=4000
        )
        rank_zero.stdin.write(GenerateInput(request=long_request).model_dump_json() + "\n")
        rank_zero.stdin.flush()
        outputs: list[RunnerOutputMessage] = []
        for line in rank_zero.stdout:
            outputs.append(parse_output(line))
            if isinstance(outputs[-1], ChunkOutput):
                processes[1].kill()
                break
        outputs += [parse_output(line) for line in rank_zero.stdout if line.strip()]
        assert rank_zero.wait(timeout=30) != 0
        failed = [o for o in outputs if isinstance(o, StatusOutput) and o.status == "failed"]
        assert failed and "closed the pipeline" in (failed[0].error or ""), outputs
    finally:
        watchdog.cancel()
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()


def _cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def test_three_uneven_ranks_match_one_process_and_sleep_while_idle(
    greedy_expected: GenerationChunk,
) -> None:
    expected = greedy_expected
    with LocalPipeline(3, layer_ranges=[(0, 6), (6, 19), (19, 30)]) as pipeline:
        pipeline.wait_ready()
        chunks = list(pipeline.generate(GREEDY))
        assert [token for chunk in chunks for token in chunk.token_ids] == expected.token_ids
        served = "".join(chunk.text for chunk in chunks)
        assert served == expected.text
        # MLX's ring receive spins a core while it waits; ranks wait on the control
        # channel. A spinning rank would show ~1 s of CPU per second here; the bound only
        # catches that.
        time.sleep(0.5)
        before = [_cpu_seconds(process.pid) for process in pipeline.processes]
        time.sleep(2.0)
        after = [_cpu_seconds(process.pid) for process in pipeline.processes]
        busy = [(b - a) / 2.0 for a, b in zip(before, after, strict=True)]
        assert all(share < 0.1 for share in busy), busy
        # ...and they still answer after the idle spell.
        assert "".join(chunk.text for chunk in pipeline.generate(GREEDY)) == served
    assert pipeline.return_codes == [0, 0, 0]


FAMILY_REQUEST = GenerationRequest(
    request_id="family", prompt="a prompt longer than the sliding window", max_tokens=12
)


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "q4"])
@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_every_family_gives_the_single_process_tokens_over_three_ranks(
    tiny_models: dict[tuple[str, bool], Path], family: str, quantized: bool
) -> None:
    """Three ranks: a first, a middle and a last stage of each family, dense and 4-bit."""
    directory = tiny_models[(family, quantized)]
    expected = load_local_engine(directory).complete(FAMILY_REQUEST)
    assert expected.completion_tokens >= 5  # random weights may reach a stop token early
    run = run_local_pipeline(3, FAMILY_REQUEST, model_path=directory)
    _assert_clean(run)
    assert run.token_ids == expected.token_ids, family
