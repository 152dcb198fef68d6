"""Hypothesis against the canonical-path guard: CANONICAL_URI, read as Caddy's RE2 reads it, accepts exactly the
request targets a plain reference check accepts, so no spelling of a path slips past the guard to vLLM."""

from __future__ import annotations

import re
import string

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gpugate.render.caddy import CANONICAL_URI
from tests.e2e.paths import NON_CANONICAL

SEGMENT_CHARS = frozenset(string.ascii_lowercase + string.digits + "-_")
# What probes are made of: the segment alphabet and every character that has a meaning in a path (dot segments,
# escapes, separators, case, controls, non-ASCII).
TRICKY = "/.%?#;\\:@&=+ \t\n\r\x00\x0bAZaz09-_~é\u212a\u0130"
FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

canonical_pattern = re.compile(CANONICAL_URI)


def guard_admits(uri: str) -> bool:
    """CANONICAL_URI as Caddy applies it: RE2's `$` is the end of the text, Python's also matches before a final
    newline, so a Python match counts only where it ends at the end of the string."""
    match = canonical_pattern.match(uri)
    return bool(match) and match.end() == len(uri)


def reference_canonical(uri: str) -> bool:
    """The canonical form in words: `/`, or `/seg(/seg)*` of lower-case letters, digits, - and _; then an optional
    `?query` without a newline."""
    path, question, query = uri.partition("?")
    if question and "\n" in query:
        return False
    if path == "/":
        return True
    segments = path.split("/")
    return segments[0] == "" and len(segments) > 1 and all(seg and set(seg) <= SEGMENT_CHARS for seg in segments[1:])


uris = st.one_of(
    st.text(alphabet=TRICKY, max_size=40),
    st.from_regex(CANONICAL_URI, fullmatch=True),  # canonical targets, which hypothesis then mutates when shrinking
    st.builds(lambda a, b: a + b, st.from_regex(r"\A(/[a-z0-9_-]+)+\Z"), st.text(alphabet=TRICKY, max_size=8)),
    st.sampled_from(NON_CANONICAL),
)


@FUZZ
@given(uri=uris)
@example(uri="/v1/models\n")  # found by this test: Python's re.match takes it, RE2 (Caddy) does not
@example(uri="/v1/models?a\nb")
@example(uri="/V1/models")
@example(uri="/v1//models")
@example(uri="/v1/models/")
def test_the_guard_admits_exactly_the_canonical_form(uri: str) -> None:
    assert guard_admits(uri) == reference_canonical(uri), uri


def test_a_final_newline_passes_pythons_dollar_but_not_the_guard_as_caddy_reads_it() -> None:
    # Regression kept from the first fuzzing run: tests that check CANONICAL_URI with a bare re.match (as
    # tests/gpugate/test_caddy.py did) would accept "/v1/models\n", which Caddy refuses.
    assert canonical_pattern.match("/v1/models\n")
    assert not guard_admits("/v1/models\n") and not reference_canonical("/v1/models\n")


@FUZZ
@given(segments=st.lists(st.text(alphabet=sorted(SEGMENT_CHARS), min_size=1, max_size=12), min_size=1, max_size=6),
       query=st.none() | st.text(alphabet=string.printable.replace("\n", ""), max_size=20))
def test_every_canonical_path_with_any_query_is_admitted(segments: list[str], query: str | None) -> None:
    uri = "/" + "/".join(segments) + ("" if query is None else "?" + query)
    assert guard_admits(uri)


@FUZZ
@given(segments=st.lists(st.text(alphabet=sorted(SEGMENT_CHARS), min_size=1, max_size=8), min_size=1, max_size=4),
       where=st.integers(min_value=0), insert=st.sampled_from(["/.", "/..", "%2e", "%2f", "//", ".", "A", ";", "\\", "~"]))
def test_any_dot_segment_escape_or_capital_inserted_into_the_path_is_refused(segments: list[str], where: int, insert: str) -> None:
    path = "/" + "/".join(segments)
    position = 1 + where % len(path)
    probe = path[:position] + insert + path[position:]
    assert not guard_admits(probe), probe
