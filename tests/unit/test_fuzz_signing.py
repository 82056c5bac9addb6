"""Fuzzing the signed record URLs (``gateway.signing.UrlSigner``): the check in front of
every recording. Whatever path and query a client sends, ``verify`` answers a bool and
never raises (an exception would be a 500 where a 403 is due); a signed URL verifies
until it expires; any change to its path or query makes it fail."""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.signing import PATH, UrlSigner

NOW = 1_800_000_000.0
TTL_S = 3600
SIGNER = UrlSigner(b"k" * 32, TTL_S)
OTHER = UrlSigner(b"o" * 32, TTL_S)
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

paths = st.from_regex(r"/records/[A-Za-z0-9._~:@!$&'()*+,;=/\-]{0,60}", fullmatch=True)


@FUZZ
@given(st.text(max_size=120), st.binary(max_size=200))
@example("/records/a.ogg", b"exp=1&sig=" + b"A" * 43)
@example("/records/a.ogg", b"exp=" + b"9" * 5000 + b"&sig=" + b"A" * 43)
@example("/records/a.ogg", b"exp=\xd9\xa1\xd9\xa2&sig=" + b"A" * 43)  # Arabic-Indic digits
@example("/records/a.ogg", b"exp=1e9&sig=" + b"A" * 43)
@example("/records/a.ogg", b"exp=-1&sig=" + b"A" * 43)
@example("/records/a.ogg", b"sig=&exp=&sig=")
@example("/records/\u00e9.ogg", b"")
def test_any_path_and_query_give_a_bool(path: str, query: bytes) -> None:
    assert SIGNER.verify(path, query, now=NOW) in (True, False)


@FUZZ
@given(paths, st.integers(0, TTL_S - 1))
def test_a_signed_url_verifies_until_it_expires(path: str, age_s: int) -> None:
    signed = SIGNER.sign(path, now=NOW)
    p, _, q = signed.partition("?")
    assert p == path and PATH.fullmatch(p)
    assert SIGNER.verify(p, q.encode(), now=NOW + age_s)
    assert not SIGNER.verify(p, q.encode(), now=NOW + TTL_S)  # expired
    assert not OTHER.verify(p, q.encode(), now=NOW)  # another key


@FUZZ
@given(paths, st.data())
def test_any_change_to_a_signed_url_fails(path: str, data: st.DataObject) -> None:
    p, _, q = SIGNER.sign(path, now=NOW).partition("?")
    target = data.draw(st.sampled_from(["path", "query"]))
    text = p if target == "path" else q
    i = data.draw(st.integers(0, len(text)))
    op = data.draw(st.sampled_from(["replace", "insert", "delete"]))
    ch = data.draw(st.characters(codec="ascii"))
    if op == "replace" and i < len(text):
        changed = text[:i] + ch + text[i + 1:]
    elif op == "insert":
        changed = text[:i] + ch + text[i:]
    else:
        changed = text[:i] + text[i + 1:]
    if changed == text:
        return
    if target == "path":
        assert not SIGNER.verify(changed, q.encode(), now=NOW)
    else:
        # Only a later expiry with its own valid MAC could pass, which needs the key.
        assert not SIGNER.verify(p, changed.encode(), now=NOW)
