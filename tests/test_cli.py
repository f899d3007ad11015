"""`exo status`, `exo place` and `exo chat` against a real node with the bundled model."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster import ExoNode, wait_until

pytestmark = pytest.mark.cluster

MODEL = "SmolLM2-135M-Instruct"


def exo(node: ExoNode, *words: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exo.command", *words, "--api", node.url],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def test_status_place_and_chat_from_the_command_line(tmp_path: Path) -> None:
    version = subprocess.run(
        [sys.executable, "-m", "exo.command", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert version.stdout.startswith("exo ") and version.stdout.split()[1][0].isdigit()

    node = ExoNode(tmp_path / "node", [])
    node.peers = [node.endpoint]
    try:
        node.start()
        # Right after the start, as in the README: the command waits for the node to come
        # up, elect itself and report its device.
        preview = exo(node, "place", MODEL, "--dry-run")
        assert preview.returncode == 0, preview.stderr
        assert preview.stdout.startswith(f"would place {MODEL}")
        assert "0-30" in preview.stdout and "predicted" in preview.stdout
        assert node.state()["instances"] == {}  # a dry run creates nothing

        empty = exo(node, "status")
        assert empty.returncode == 0, empty.stderr
        assert "nodes (1):" in empty.stdout and "(master)" in empty.stdout
        assert "none (exo place MODEL)" in empty.stdout

        unknown = exo(node, "place", "no-such-model")
        assert unknown.returncode == 1
        assert unknown.stderr.startswith("exo: 404: unknown model 'no-such-model'")
        assert len(unknown.stderr.strip().splitlines()) == 1

        placed = exo(node, "place", MODEL)
        assert placed.returncode == 0, placed.stderr
        instance_id = placed.stdout.split()[2].rstrip(":")
        assert instance_id in node.state()["instances"]

        def ready() -> bool:
            return " ready " in exo(node, "status").stdout

        wait_until(ready, 90.0, "status to show the instance ready")
        started = time.monotonic()
        answer = exo(
            node,
            "chat",
            MODEL,
            "What is the capital of France?",
            "--temperature",
            "0",
            "--max-tokens",
            "12",
        )
        assert answer.returncode == 0, answer.stderr
        assert "Paris" in answer.stdout, answer.stdout
        assert time.monotonic() - started < 60.0

        status = exo(node, "status")
        assert instance_id[:8] in status.stdout and MODEL in status.stdout
        assert "0-30" in status.stdout
    finally:
        node.kill()


def test_a_node_that_is_not_there_is_one_sentence() -> None:
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "exo.command",
            "status",
            "--api",
            "http://127.0.0.1:9",
            "--wait",
            "0",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert missing.returncode == 1
    assert missing.stderr.startswith("exo: cannot reach the node's API at http://127.0.0.1:9")
    assert len(missing.stderr.strip().splitlines()) == 1
