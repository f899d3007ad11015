"""Where the API may listen: loopback freely, anywhere else with a key, or with
``--insecure-api`` and a logged warning."""

import pytest

from exo.main import build_parser, config_from_args
from exo.node import StartupError


@pytest.fixture(autouse=True)
def no_key_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXO_API_KEY", raising=False)


def test_beyond_loopback_without_a_key_is_refused(logged_warnings: list[str]) -> None:
    with pytest.raises(StartupError, match="without a key"):
        config_from_args(build_parser().parse_args(["--api-host", "0.0.0.0"]))
    assert logged_warnings == []


def test_insecure_api_is_allowed_with_a_warning(logged_warnings: list[str]) -> None:
    config = config_from_args(
        build_parser().parse_args(["--api-host", "0.0.0.0", "--insecure-api"])
    )
    assert config.api_host == "0.0.0.0" and config.api_key is None
    assert len(logged_warnings) == 1
    assert "0.0.0.0 without a key (--insecure-api)" in logged_warnings[0]


@pytest.mark.parametrize(
    "flags",
    [[], ["--api-host", "127.0.0.1"], ["--api-host", "0.0.0.0", "--api-key", "k" * 24]],
    ids=["default", "loopback", "with-key"],
)
def test_no_warning_where_nothing_is_exposed_without_a_key(
    flags: list[str], logged_warnings: list[str]
) -> None:
    config_from_args(build_parser().parse_args(flags))
    assert logged_warnings == []
