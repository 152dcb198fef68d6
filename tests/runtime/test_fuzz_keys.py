"""Hypothesis against authz's reading of `Authorization: Bearer <key>` and the key parser: no input makes them raise,
and they accept exactly what a reference check of the key's form accepts, so nothing malformed reaches a key lookup."""

from __future__ import annotations

import string

from hypothesis import example, given, settings
from hypothesis import strategies as st

from gpugate_runtime.keys import ID_HEX, SECRET_BYTES, TOKEN_PREFIX, bearer_key, key_id_of

HEX = "0123456789abcdef"
FUZZ = settings(max_examples=300, deadline=None, database=None)


def reference_key(token: str) -> str | None:
    """The key id of `ggk_<12 lower hex>_<64 lower hex>`, checked without a regular expression."""
    parts = token.split("_")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        return None
    key_id, secret = parts[1], parts[2]
    if len(key_id) != ID_HEX or len(secret) != SECRET_BYTES * 2 or not set(key_id + secret) <= set(HEX):
        return None
    return key_id


def reference_bearer(header: bytes) -> tuple[str, str] | None:
    """RFC 6750's `Bearer 1*SP token`, scheme case-insensitive, surrounding whitespace ignored."""
    scheme, space, rest = header.partition(b" ")
    if scheme.lower() != b"bearer" or not space:
        return None
    token = rest.strip(b" \t\n\r\x0b\x0c").decode("latin-1")
    key_id = reference_key(token)
    return (key_id, token) if key_id else None


def well_formed() -> st.SearchStrategy[str]:
    return st.builds(
        lambda i, s: f"{TOKEN_PREFIX}_{i}_{s}",
        st.text(alphabet=HEX, min_size=ID_HEX, max_size=ID_HEX),
        st.text(alphabet=HEX, min_size=SECRET_BYTES * 2, max_size=SECRET_BYTES * 2),
    )


def mutated(token: str, data: st.DataObject) -> str:
    """A well-formed key with one character replaced, inserted or removed."""
    where = data.draw(st.integers(min_value=0, max_value=len(token) - 1))
    change = data.draw(st.sampled_from(["replace", "insert", "delete"]))
    char = data.draw(st.characters(codec="latin-1"))
    if change == "replace":
        return token[:where] + char + token[where + 1 :]
    if change == "insert":
        return token[:where] + char + token[where:]
    return token[:where] + token[where + 1 :]


tokens = st.one_of(well_formed(), st.text(max_size=90), st.text(alphabet=HEX + "_gkGK \n\t", max_size=90))


@FUZZ
@given(token=tokens)
@example(token=f"{TOKEN_PREFIX}_{'a' * ID_HEX}_{'b' * SECRET_BYTES * 2}\n")  # found by this test: `$` took the newline
@example(token=f"{TOKEN_PREFIX}_{'A' * ID_HEX}_{'b' * SECRET_BYTES * 2}")
def test_the_key_parser_accepts_exactly_the_keys_form(token: str) -> None:
    assert key_id_of(token) == reference_key(token), repr(token)


@FUZZ
@given(token=well_formed(), data=st.data())
def test_a_key_with_one_character_changed_is_accepted_only_if_still_well_formed(token: str, data: st.DataObject) -> None:
    assert key_id_of(token) is not None
    changed = mutated(token, data)
    assert key_id_of(changed) == reference_key(changed), repr(changed)


headers = st.one_of(
    st.binary(max_size=120),
    st.builds(
        lambda scheme, gap, token, tail: scheme + gap + token.encode("latin-1") + tail,
        st.sampled_from([b"Bearer", b"bearer", b"BEARER", b"Basic", b"Bearer:", b"", b"Bear er"]),
        st.sampled_from([b" ", b"  ", b"\t", b"", b" \t"]),
        st.one_of(well_formed(), st.text(alphabet=string.printable, max_size=80)),
        st.sampled_from([b"", b" ", b"\r\n", b"\x00", b",x", b"\t"]),
    ),
)


@FUZZ
@given(header=headers)
@example(header=b"Bearer " + f"{TOKEN_PREFIX}_{'a' * ID_HEX}_{'b' * SECRET_BYTES * 2}".encode() + b"\n")
@example(header=b"Bearer\t" + f"{TOKEN_PREFIX}_{'a' * ID_HEX}_{'b' * SECRET_BYTES * 2}".encode())
def test_authz_reads_a_bearer_header_as_the_reference_does_and_never_raises(header: bytes) -> None:
    assert bearer_key(header) == reference_bearer(header), repr(header)
