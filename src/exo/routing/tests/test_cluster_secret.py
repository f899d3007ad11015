from pathlib import Path

import pytest

from exo.routing.cluster_secret import (
    DICTIONARY_FILE,
    SECRET_ENV,
    SECRET_FILE,
    ClusterSecretError,
    resolve_cluster_secret,
)


def test_the_flag_beats_the_environment_which_beats_the_stored_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    made = resolve_cluster_secret(None, tmp_path)
    assert made.created and len(made.value) >= 16
    assert resolve_cluster_secret(None, tmp_path).value == made.value

    monkeypatch.setenv(SECRET_ENV, "from-the-environment-1")
    from_env = resolve_cluster_secret(None, tmp_path)
    assert (from_env.value, from_env.source, from_env.replaced) == (
        "from-the-environment-1",
        SECRET_ENV,
        True,
    )
    from_flag = resolve_cluster_secret("from-the-flag-000001", tmp_path)
    assert (from_flag.value, from_flag.replaced, from_flag.created) == (
        "from-the-flag-000001",
        True,
        False,
    )
    assert (tmp_path / SECRET_FILE).read_text().strip() == "from-the-flag-000001"
    assert (tmp_path / DICTIONARY_FILE).read_text() == "exo:from-the-flag-000001\n"
    for name in (SECRET_FILE, DICTIONARY_FILE):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    "bad", ["short", "sixteen chars here", "colon:colon:colon:", "tab\there-1234567"]
)
def test_an_unusable_secret_is_refused_and_nothing_is_stored(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ClusterSecretError):
        resolve_cluster_secret(bad, tmp_path)
    assert list(tmp_path.iterdir()) == []
