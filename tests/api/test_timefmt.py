"""The one timestamp format: written as RFC 3339 UTC seconds, read back from any RFC 3339 / ISO 8601 form."""
import pytest

from branchmerge.api.timefmt import format_time, parse_time

T = 1767323045.0  # 2026-01-02T03:04:05Z


def test_format_is_kubernetes_seconds_in_utc():
    assert format_time(T) == "2026-01-02T03:04:05Z"
    assert format_time(T + 0.9) == "2026-01-02T03:04:05Z"  # whole seconds, as the API server keeps them
    assert parse_time(format_time()) is not None


@pytest.mark.parametrize("text", ["2026-01-02T03:04:05Z", "2026-01-02T03:04:05.000000Z", "2026-01-02T03:04:05+00:00",
                                  "2026-01-02T04:04:05+01:00", "2026-01-02T03:04:05"])
def test_parse_reads_every_form_the_cluster_and_kopf_write(text):
    assert parse_time(text) == T  # a zone-less time (kopf's peering lastseen) is UTC


@pytest.mark.parametrize("text", [None, "", "yesterday", "2026-13-01T00:00:00Z", 5])
def test_unreadable_times_are_none(text):
    assert parse_time(text) is None
