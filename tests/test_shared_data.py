"""The shared-data guard of ``conftest.shared_path``: skip without ../shared, fail under GEOLINK_REQUIRE_SHARED=1."""

from __future__ import annotations

import pytest
from conftest import REQUIRE_SHARED, SHARED, shared_path

MISSING = ("no-such-folder", "nothing.safetensors")


def test_a_missing_shared_path_skips_by_default(monkeypatch):
    monkeypatch.delenv(REQUIRE_SHARED, raising=False)
    with pytest.raises(pytest.skip.Exception, match="nothing.safetensors"):
        shared_path(*MISSING)


@pytest.mark.parametrize("value", ["0", ""])
def test_only_the_value_1_requires_the_shared_data(monkeypatch, value):
    monkeypatch.setenv(REQUIRE_SHARED, value)
    with pytest.raises(pytest.skip.Exception):
        shared_path(*MISSING)


def test_a_missing_shared_path_fails_when_required(monkeypatch):
    monkeypatch.setenv(REQUIRE_SHARED, "1")
    expected = str(SHARED.joinpath("data", *MISSING))
    with pytest.raises(pytest.fail.Exception) as failure:
        shared_path(*MISSING)
    assert expected in str(failure.value) and REQUIRE_SHARED in str(failure.value)


def test_a_present_path_is_returned_under_the_requirement(monkeypatch, tmp_path):
    monkeypatch.setenv(REQUIRE_SHARED, "1")
    (tmp_path / "data" / "osm").mkdir(parents=True)
    monkeypatch.setattr("conftest.SHARED", tmp_path)
    assert shared_path("osm") == tmp_path / "data" / "osm"
