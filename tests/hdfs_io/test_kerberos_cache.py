"""hdfs_io.fs.kerberos: reading MIT FILE ticket caches, and what it says of a missing, expired or damaged one.

The caches are written here in the documented format; tests/test_kerberos.py reads real ones that kinit wrote.
"""

from __future__ import annotations

import struct

import pytest

from hdfs_io.fs import kerberos

NOW = 1_800_000_000


def counted(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def principal(name: str) -> bytes:
    components, _, realm = name.rpartition("@")
    parts = components.split("/")
    return struct.pack(">II", 1, len(parts)) + counted(realm.encode()) + b"".join(counted(p.encode()) for p in parts)


def credential(client: str, server: str, end: int) -> bytes:
    return (principal(client) + principal(server) + struct.pack(">H", 18) + counted(b"k" * 32)
            + struct.pack(">4I", end - 600, end - 600, end, 0) + b"\0" + struct.pack(">I", 0)
            + struct.pack(">II", 0, 0) + counted(b"ticket") + counted(b""))


def write_cache(path, owner: str, *credentials: bytes) -> None:
    header = struct.pack(">HH", 1, 8) + b"\0" * 8  # the KDC time offset tag
    path.write_bytes(struct.pack(">HH", 0x0504, len(header)) + header + principal(owner) + b"".join(credentials))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "krb5cc"
    monkeypatch.setenv("KRB5CCNAME", f"FILE:{path}")
    return path


def test_a_valid_ticket_gives_its_principal_and_no_problem(cache):
    write_cache(cache, "alice@EXAMPLE.ORG",
                credential("alice@EXAMPLE.ORG", "krbtgt/EXAMPLE.ORG@EXAMPLE.ORG", NOW + 60),
                credential("alice@EXAMPLE.ORG", "nn/host@EXAMPLE.ORG", NOW + 60))

    assert kerberos.ticket_principal() == "alice@EXAMPLE.ORG"
    assert kerberos.ticket_problem(now=NOW) is None
    assert [t.server for t in kerberos.read_cache(str(cache)).tickets] == [
        "krbtgt/EXAMPLE.ORG@EXAMPLE.ORG", "nn/host@EXAMPLE.ORG"]


def test_an_expired_ticket_says_whose_and_when(cache):
    write_cache(cache, "alice@EXAMPLE.ORG", credential("alice@EXAMPLE.ORG", "krbtgt/EXAMPLE.ORG@EXAMPLE.ORG", NOW))

    problem = kerberos.ticket_problem(now=NOW + 1)

    assert problem.startswith(f"the Kerberos ticket of alice@EXAMPLE.ORG in FILE:{cache} expired at 2027-01-15")
    assert problem.endswith("(run kinit)")


def test_a_missing_cache_a_cache_without_a_tgt_and_a_cut_one_are_each_named(cache):
    assert "has no Kerberos ticket: the ticket cache" in kerberos.ticket_problem(now=NOW)
    write_cache(cache, "alice@EXAMPLE.ORG", credential("alice@EXAMPLE.ORG", "nn/host@EXAMPLE.ORG", NOW + 60))
    assert kerberos.ticket_problem(now=NOW).startswith("no Kerberos ticket for alice@EXAMPLE.ORG")
    cache.write_bytes(cache.read_bytes()[:-3])
    assert "the ticket cache is cut short" in kerberos.ticket_problem(now=NOW)
    cache.write_bytes(b"not a cache")
    assert "is not a Kerberos ticket cache" in kerberos.ticket_problem(now=NOW)
    assert kerberos.ticket_principal() is None


def test_the_latest_of_several_tgts_counts(cache):
    tgt = "krbtgt/EXAMPLE.ORG@EXAMPLE.ORG"
    write_cache(cache, "alice@EXAMPLE.ORG", credential("alice@EXAMPLE.ORG", tgt, NOW - 60),
                credential("alice@EXAMPLE.ORG", tgt, NOW + 60))

    assert kerberos.ticket_problem(now=NOW) is None


def test_caches_other_than_files_and_token_logins_are_not_guessed_at(monkeypatch, tmp_path):
    monkeypatch.setenv("KRB5CCNAME", "KEYRING:persistent:0")
    assert kerberos.ticket_problem() is None and kerberos.ticket_principal() is None
    assert kerberos.cache_path(str(tmp_path / "plain")) == str(tmp_path / "plain")
    monkeypatch.setenv("KRB5CCNAME", str(tmp_path / "missing"))
    monkeypatch.setenv("HADOOP_TOKEN_FILE_LOCATION", str(tmp_path / "tokens"))
    assert kerberos.ticket_problem() is None  # a YARN container authenticates with delegation tokens


def test_without_krb5ccname_the_configured_default_cache_is_used(monkeypatch, tmp_path):
    monkeypatch.delenv("KRB5CCNAME", raising=False)
    conf = tmp_path / "krb5.conf"
    monkeypatch.setenv("KRB5_CONFIG", f"{tmp_path / 'absent.conf'}:{conf}")
    conf.write_text("[libdefaults]\n  default_realm = EXAMPLE.ORG\n")
    assert kerberos.cache_name().startswith("FILE:/tmp/krb5cc_")
    conf.write_text("[libdefaults]\n  default_ccache_name = KEYRING:persistent:%{uid}\n")
    assert kerberos.cache_name().startswith("KEYRING:persistent:") and kerberos.ticket_problem() is None
