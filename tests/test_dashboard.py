"""The dashboard at ``/``: its live stream (``GET /state/stream``) on its own, and the page in
a real browser (headless Chromium from Debian's packages, driven by Selenium) against a real
3-node cluster with simulated GPUs.

Set ``EXO_DASHBOARD_SCREENSHOTS=DIR`` to keep the browser test's screenshots in DIR (the
ones in docs/images were made so); otherwise they go to the test's temporary directory.
"""

import itertools
import json
import os
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any, cast

import anyio
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from exo.api.context import ApiContext
from exo.api.dashboard import EventStreamResponse, dashboard_routes, state_frames
from exo.shared.event_store import EventStore
from exo.shared.types.events import IndexedEvent, MasterElected
from exo.shared.types.ids import NodeId
from tests.cluster import running_cluster, wait_converged, wait_until
from tests.simulated import device, write_devices

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
MODEL = "SmolLM2-135M-Instruct"
NODE = NodeId("node-under-test")


# ---------------------------------------------------------------- the stream on its own


class FakeClient:
    """The ASGI side of one streaming request: collects what the response sends and
    disconnects when told."""

    def __init__(self) -> None:
        self.frames: list[tuple[float, str]] = []
        self.started: dict[str, Any] | None = None
        self.gone = anyio.Event()
        self.requested = False

    async def receive(self) -> dict[str, Any]:
        if not self.requested:
            self.requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Any) -> None:
        if message["type"] == "http.response.start":
            self.started = message
        else:
            self.frames.append((anyio.current_time(), message["body"].decode()))

    def states(self) -> list[dict[str, Any]]:
        return [
            json.loads(frame.split("data: ", 1)[1])
            for _, frame in self.frames
            if frame.startswith("event: state\n")
        ]


def elect(store: EventStore, idx: int) -> None:
    store.append(IndexedEvent(idx=idx, event=MasterElected(master_node_id=NodeId(f"m{idx}"))))


@pytest.mark.anyio
async def test_stream_sends_the_state_then_coalesced_changes_and_ends_on_disconnect() -> None:
    store = EventStore(None)
    client = FakeClient()
    frames = state_frames(store, NODE, min_interval_s=0.25, keepalive_s=60)
    response = EventStreamResponse(frames)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(response, {"type": "http"}, client.receive, client.send)
            await anyio.sleep(0.1)
            assert client.started is not None
            headers = dict(client.started["headers"])
            assert headers[b"content-type"].startswith(b"text/event-stream")
            assert b"content-length" not in headers
            assert [state["last_event_applied_idx"] for state in client.states()] == [-1]
            assert client.states()[0]["node_id"] == NODE
            # 40 changes in 1 s: at most one frame per 0.25 s, and the last one is sent.
            changes_at = anyio.current_time()
            for idx in range(40):
                elect(store, idx)
                await anyio.sleep(0.025)
            await anyio.sleep(0.4)
            states = client.states()
            assert states[-1]["last_event_applied_idx"] == 39
            assert states[-1]["master_node_id"] == "m39"
            elapsed = anyio.current_time() - changes_at
            sent = [at for at, frame in client.frames if at >= changes_at and "event:" in frame]
            assert 3 <= len(sent) <= elapsed / 0.25 + 1 < 40, (sent, elapsed)
            gaps = [later - earlier for earlier, later in itertools.pairwise(sent)]
            assert min(gaps) >= 0.24, gaps
            # Nothing changed: nothing sent.
            count = len(client.frames)
            await anyio.sleep(0.3)
            assert len(client.frames) == count
            client.gone.set()
    # The response returned on the disconnect and the generator is closed.
    assert getattr(frames, "ag_frame", "missing") is None


@pytest.mark.anyio
async def test_stream_sends_keep_alives_while_nothing_changes() -> None:
    store = EventStore(None)
    client = FakeClient()
    frames = state_frames(store, NODE, min_interval_s=0.01, keepalive_s=0.2)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(
                EventStreamResponse(frames), {"type": "http"}, client.receive, client.send
            )
            await anyio.sleep(0.7)
            client.gone.set()
    keepalives = [frame for _, frame in client.frames if frame == ": keep-alive\n\n"]
    assert 2 <= len(keepalives) <= 4, client.frames
    assert len(client.states()) == 1


def test_the_page_and_its_files_are_served_and_nothing_else() -> None:
    store = EventStore(None)
    context = cast(ApiContext, type("Context", (), {"store": store, "node_id": NODE})())
    app = FastAPI()
    app.include_router(dashboard_routes(context))
    client = TestClient(app)
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert 'src="dashboard/dashboard.js"' in page.text
    script = client.get("/dashboard/dashboard.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert "state/stream" in script.text
    assert client.get("/dashboard/dashboard.css").headers["content-type"].startswith("text/css")
    for name in ("missing.js", "..%2Fdashboard.py", "%2E%2E%2F__init__.py"):
        assert client.get(f"/dashboard/{name}").status_code == 404, name


# ---------------------------------------------------------------- the page in a browser


SNAPSHOT = """
return [...document.querySelectorAll(arguments[0])].map((node) => {
  const found = {text: node.innerText, visible: node.offsetParent !== null || node.tagName === "BODY"};
  for (const attribute of node.attributes) found[attribute.name] = attribute.value;
  return found;
});
"""


def browser_missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install chromium chromium-driver)"
    if not CHROMEDRIVER.exists():
        return f"{CHROMEDRIVER} is missing (apt-get install chromium-driver)"
    return None


@pytest.fixture
def browser() -> Generator[Any]:
    reason = browser_missing()
    if reason is not None:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,2000",  # tall: element screenshots are cut at the window
        "--force-device-scale-factor=1",
    ):
        options.add_argument(argument)
    try:
        driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    except WebDriverException as error:  # a stub package (a snap wrapper, say) that cannot run
        pytest.skip(f"{CHROMIUM} does not start: {str(error.msg).splitlines()[0]}")
    try:
        yield driver
    finally:
        driver.quit()


def screenshot_dir(tmp_path: Path) -> Path:
    wanted = os.environ.get("EXO_DASHBOARD_SCREENSHOTS")
    directory = Path(wanted) if wanted else tmp_path / "screenshots"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def devices_for(index: int) -> list[dict[str, Any]]:
    gib = 1024**3
    return [
        [device("cuda:0", "Sim RTX 4090", 24, 1008, memory_used_bytes=3 * gib)],
        [
            device("cuda:0", "Sim A100", 80, 2039, compute_utilization_percent=35),
            device("cuda:1", "Sim T4", 16, 320, thermal_temperature_c=62),
        ],
        [device("cuda:0", "Sim H100", 80, 3350, thermal_temperature_c=51)],
    ][index]


@pytest.mark.cluster
def test_the_dashboard_in_a_browser(tmp_path: Path, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = browser
    shots = screenshot_dir(tmp_path)
    files = [write_devices(tmp_path / f"gpus{i}.json", devices_for(i)) for i in range(3)]

    def args(index: int) -> list[str]:
        return [
            *("--simulate-gpus", str(files[index]), "--telemetry-interval", "0.5"),
            *("--friendly-name", f"node{index}"),
        ]

    def find(selector: str) -> list[Any]:
        """Elements to act on: only the forms' own, which the live updates never replace."""
        return driver.find_elements(By.CSS_SELECTOR, selector)

    def shown(selector: str) -> list[dict[str, Any]]:
        """Each match's text and attributes, read in one go (the live parts of the page are
        rebuilt on every update, so held element references go stale)."""
        return driver.execute_script(SNAPSHOT, selector)

    def text_of(selector: str) -> str:
        found = shown(selector)
        return found[0]["text"] if found else ""

    with running_cluster(tmp_path, 3, args) as nodes:
        wait_converged(nodes, 3, "the cluster to agree")
        ids = [node.node_id() for node in nodes]
        node = nodes[0]
        driver.get(node.url + "/")

        # Every device of every node, named, with its live reading.
        expected = {f"{ids[0]}/cuda:0", f"{ids[1]}/cuda:0", f"{ids[1]}/cuda:1", f"{ids[2]}/cuda:0"}

        def all_devices_shown() -> bool:
            cards = {card["data-device"] for card in shown(".device")}
            return cards == expected and not shown(".device .empty")

        try:
            wait_until(all_devices_shown, 60.0, "the page to list the 4 devices")
        except AssertionError as error:
            readings = {n: sorted(d) for n, d in node.state()["gpu_device_state"].items()}
            raise AssertionError(
                f"{error}: the page shows {[c['data-device'] for c in shown('.device')]}, "
                f"{text_of('#nodes-body')[:300]!r}; the state has {readings}; "
                f"browser log {driver.get_log('browser')}"
            ) from error
        assert text_of("#connection") == "live"
        assert not shown("#banner")[0]["visible"]
        assert not shown("#key-form")[0]["visible"], "no key is asked for where none is needed"
        names = sorted(card["text"] for card in shown(".device .device-name"))
        assert names == ["Sim A100", "Sim H100", "Sim RTX 4090", "Sim T4"]
        rtx = text_of(f'[data-device="{ids[0]}/cuda:0"] .metric-memory')
        assert "3.0 GiB / 24.0 GiB" in rtx, rtx
        assert "35 %" in text_of(f'[data-device="{ids[1]}/cuda:0"] .metric-util')
        assert len(shown(".node")) == 3
        assert "No instances" in text_of("#instances-body")

        # A device that starts throttling shows so within 3 s of the file write.
        t4_key = f"{ids[1]}/cuda:1"
        t4 = f'[data-device="{t4_key}"]'
        assert shown(t4)[0]["data-throttling"] == "false"
        hot = devices_for(1)
        hot[1] |= {"is_thermal_throttling": True, "thermal_temperature_c": 91}
        written_at = time.monotonic()
        write_devices(files[1], hot)
        wait_until(
            lambda: shown(t4)[0]["data-throttling"] == "true",
            60.0,
            "the page to show the T4 throttling",
        )
        # How fast is bench/telemetry_cluster.py's to say (goal: 3 s); here, that it shows.
        print(f"the throttling T4 showed on the page {time.monotonic() - written_at:.2f} s later")
        assert text_of(f"{t4} .throttle") == "throttling"
        assert "91 °C / 87 °C" in text_of(f"{t4} .metric-temp")
        assert shown(f"{t4} .metric-temp svg.spark polyline")
        assert not any(
            card["data-throttling"] == "true"
            for card in shown(".device")
            if card["data-device"] != t4_key
        )

        # The form: an unknown model's error as text, then the bundled model's dry run.
        find("#place-model-text")[0].send_keys("no-such-model")
        find("#place-preview")[0].click()
        wait_until(
            lambda: "unknown model" in text_of("#place-result .error"), 60.0, "the 404 shown"
        )
        assert text_of("#place-result .error").startswith("404: ")
        find("#place-model-text")[0].clear()
        wait_until(
            lambda: bool(shown(f'#place-model option[value="{MODEL}"]')), 60.0, "the model list"
        )
        Select(find("#place-model")[0]).select_by_value(MODEL)
        min_nodes = find("#place-min-nodes")[0]
        min_nodes.clear()
        min_nodes.send_keys("3")
        find("#place-preview")[0].click()
        wait_until(
            lambda: len(shown("#place-result .layer-map .segment")) == 3, 60.0, "the preview"
        )
        assert "nothing created" in text_of("#place-result h4")
        assert shown("#place-result .reasons li"), "the preview shows the decision's reasons"
        assert not node.state()["instances"], "a dry run creates nothing"
        find("#place")[0].screenshot(str(shots / "dashboard-place.png"))

        # Place it: the instance's layer map shows which layers sit on which device.
        find("#place-submit")[0].click()
        card = f'.instance[data-model="{MODEL}"]'
        try:
            wait_until(
                lambda: len(shown(f"{card} .layer-map .segment")) == 3, 30.0, "the layer map"
            )
        except AssertionError as error:
            held = {
                key: [(s["node_id"], s["device_id"]) for s in value["shards"]]
                for key, value in node.state()["instances"].items()
            }
            raise AssertionError(
                f"{error}: the form says {text_of('#place-result')[:300]!r}; the page shows "
                f"{[s['data-device'] for s in shown('.instance .layer-map .segment')]}; "
                f"the state has {held}; browser log {driver.get_log('browser')}"
            ) from error
        (instance,) = node.state()["instances"].values()
        placed = {
            (shard["node_id"], shard["device_id"], f"{shard['start_layer']}-{shard['end_layer']}")
            for shard in instance["shards"]
        }
        segments = shown(f"{card} .layer-map .segment")
        assert {(s["data-node"], s["data-device"], s["data-range"]) for s in segments} == placed
        assert len({s["data-node"] for s in segments}) == 3
        assert segments[0]["data-range"].startswith("0-")
        for segment in segments:  # each says its layers and its device
            assert segment["text"].startswith("layer"), segment["text"]
            assert f"{segment['data-device']} (Sim " in segment["text"], segment["text"]
        assert shown(f"{card} .reasons li")
        assert "ms" in text_of(f"{card} .perf-predicted")

        # The page says when the runners are ready; then the chat box streams the answer.
        wait_until(
            lambda: shown(card)[0]["data-health"] == "ready", 120.0, "the runners to be ready"
        )
        assert len(shown(f'{card} .runner[data-status="ready"]')) == 3

        wait_until(lambda: bool(shown(f'#chat-model option[value="{MODEL}"]')), 60.0, "the model")
        max_tokens = find("#chat-max-tokens")[0]
        max_tokens.clear()
        max_tokens.send_keys("12")
        find("#chat-input")[0].send_keys("What is the capital of France?")
        find("#chat-send")[0].click()
        partials: set[str] = set()

        def answered() -> bool:
            bubbles = shown(".bubble.assistant")
            if not bubbles:
                return False
            partials.add(text_of(".bubble.assistant:last-child .text"))
            return bubbles[-1].get("data-done") == "true" or bool(shown(".chat-error"))

        wait_until(answered, 90.0, "the chat answer")
        assert not shown(".chat-error"), text_of(".chat-error")
        answer = text_of(".bubble.assistant .text")
        assert "Paris" in answer, answer
        assert partials - {"", answer}, f"the answer did not stream: {partials}"
        assert text_of("#chat-status").startswith("done")

        # A follow-up in the same conversation (the runners report their timings from the
        # second request after loading): what rank 0 measured shows beside the prediction.
        find("#chat-input")[0].send_keys("And of Germany?")
        find("#chat-send")[0].click()
        wait_until(lambda: len(shown('.bubble.assistant[data-done="true"]')) == 2, 60.0, "answer 2")
        assert not shown(".chat-error"), text_of(".chat-error")
        find("#chat")[0].screenshot(str(shots / "dashboard-chat.png"))
        wait_until(lambda: "tok/s" in text_of(f"{card} .perf-measured"), 60.0, "the measurement")
        find("#nodes")[0].screenshot(str(shots / "dashboard-devices.png"))
        find("#instances")[0].screenshot(str(shots / "dashboard-instance.png"))
        driver.set_window_size(1400, 900)
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(shots / "dashboard.png"))

        # The node goes away: a banner says so; it comes back: the page reconnects by itself.
        node.kill()
        wait_until(lambda: shown("#banner")[0]["visible"], 60.0, "the disconnected banner")
        assert "reconnecting" in text_of("#banner")
        assert text_of("#connection") == "disconnected"
        node.start()
        node.wait_ready()
        wait_until(lambda: not shown("#banner")[0]["visible"], 60.0, "the page to reconnect")
        assert text_of("#connection") == "live"


def test_browser_skip_reason_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tests.test_dashboard.CHROMIUM", Path("/nonexistent/chromium"))
    reason = browser_missing()
    assert reason is not None and "apt-get install chromium" in reason
