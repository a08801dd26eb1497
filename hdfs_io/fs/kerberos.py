"""The user's Kerberos ticket, as a Hadoop client finds it: whose it is, and whether it is still good.

HDFS clients fail without a usable ticket in words that do not say so: libhdfs's NameNode
"did not answer", hdfs-native's GSSAPI major codes. `ticket_problem` names the cause instead.

It reads the ticket cache that KRB5CCNAME names (`FILE:path` or a plain path; when unset, the
`default_ccache_name` of krb5.conf, else MIT's `/tmp/krb5cc_<uid>`), in MIT's documented FILE cache
format (versions 3 and 4), the one format that Java's Kerberos, and so libhdfs, reads too. Other
cache types (KEYRING:, KCM:, DIR:) are not read, and a process that holds Hadoop delegation tokens
(HADOOP_TOKEN_FILE_LOCATION: a YARN container) needs no ticket: `ticket_problem` then says nothing
rather than guess.
"""

from __future__ import annotations

import getpass
import os
import re
import struct
import time
from dataclasses import dataclass


class CacheFormatError(ValueError):
    """The file is not a ticket cache this module can read."""


@dataclass(frozen=True)
class Ticket:
    """A credential in a cache: the client and server principals, and when it ends (Unix seconds)."""

    client: str
    server: str
    end: int


@dataclass(frozen=True)
class TicketCache:
    """What a FILE ticket cache holds: its default principal and its credentials."""

    principal: str
    tickets: tuple[Ticket, ...]

    def tgt(self) -> Ticket | None:
        """Returns the ticket-granting ticket of the default principal's realm that ends last, if the cache has one."""
        realm = self.principal.rpartition("@")[2]
        return max((t for t in self.tickets if t.server == f"krbtgt/{realm}@{realm}"), key=lambda t: t.end,
                   default=None)


def cache_name() -> str:
    """Returns the ticket cache a Kerberos client uses here: KRB5CCNAME, else krb5.conf's default_ccache_name
    (KRB5_CONFIG's files, else /etc/krb5.conf), else MIT's default."""
    if os.environ.get("KRB5CCNAME"):
        return os.environ["KRB5CCNAME"]
    for conf in (os.environ.get("KRB5_CONFIG") or "/etc/krb5.conf").split(":"):
        try:
            with open(conf, errors="replace") as f:
                found = re.search(r"^\s*default_ccache_name\s*=\s*(\S+)", f.read(), re.MULTILINE)
        except OSError:
            continue
        if found:
            return found.group(1).replace("%{uid}", str(os.getuid())).replace("%{USERID}", str(os.getuid()))
    return f"FILE:/tmp/krb5cc_{os.getuid()}"


def cache_path(name: str) -> str | None:
    """Returns the file of a FILE cache name (`FILE:/p` or `/p`), or None for other cache types."""
    kind, sep, rest = name.partition(":")
    if not sep:
        return name
    return rest if kind.upper() == "FILE" else None


def read_cache(path: str) -> TicketCache:
    """Reads a FILE ticket cache.

    Raises:
        FileNotFoundError: there is no such file.
        CacheFormatError: it is not a version 3 or 4 FILE cache, or it is cut short.
    """
    with open(path, "rb") as f:
        data = f.read()
    reader = _Reader(data)
    version = reader.u16()
    if version not in (0x0503, 0x0504):
        raise CacheFormatError(f"{path} is not a Kerberos ticket cache (version {version:#06x})")
    if version == 0x0504:
        reader.skip(reader.u16())  # header tags: the KDC time offset
    principal = reader.principal()
    tickets = []
    while not reader.done():
        client, server = reader.principal(), reader.principal()
        reader.u16()  # key type
        if version == 0x0503:
            reader.u16()
        reader.octets()  # key
        _auth, _start, end, _renew_till = struct.unpack(">4I", reader.take(16))
        reader.take(5)  # is_skey, flags
        for _ in range(reader.u32()):  # addresses
            reader.u16(), reader.octets()
        for _ in range(reader.u32()):  # authorization data
            reader.u16(), reader.octets()
        reader.octets(), reader.octets()  # ticket, second ticket
        tickets.append(Ticket(client, server, end))
    return TicketCache(principal, tuple(tickets))


def ticket_principal() -> str | None:
    """Returns the principal of this process's ticket cache (`alice@REALM`), or None if there is none to read."""
    path = cache_path(cache_name())
    try:
        return read_cache(path).principal if path else None
    except (OSError, CacheFormatError):
        return None


def ticket_problem(now: float | None = None) -> str | None:
    """Returns why this process has no usable Kerberos ticket, in words, or None if it has one.

    None also when the cache is of a type this module does not read, and when the process holds
    Hadoop delegation tokens instead.
    """
    if os.environ.get("HADOOP_TOKEN_FILE_LOCATION"):
        return None
    name = cache_name()
    path = cache_path(name)
    if path is None:
        return None
    try:
        cache = read_cache(path)
    except FileNotFoundError:
        return f"user {getpass.getuser()} has no Kerberos ticket: the ticket cache {name} does not exist (run kinit)"
    except (OSError, CacheFormatError) as e:
        return f"cannot read the Kerberos ticket cache {name}: {e}"
    tgt = cache.tgt()
    if tgt is None:
        return f"no Kerberos ticket for {cache.principal} in {name} (run kinit)"
    if tgt.end <= (time.time() if now is None else now):
        ended = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(tgt.end))
        return f"the Kerberos ticket of {cache.principal} in {name} expired at {ended} (run kinit)"
    return None


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def done(self) -> bool:
        return self.at >= len(self.data)

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise CacheFormatError("the ticket cache is cut short")
        chunk = self.data[self.at:self.at + n]
        self.at += n
        return chunk

    def skip(self, n: int) -> None:
        self.take(n)

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def octets(self) -> bytes:
        return self.take(self.u32())

    def principal(self) -> str:
        self.u32()  # name type
        count = self.u32()
        realm = self.octets().decode(errors="replace")
        return "/".join(self.octets().decode(errors="replace") for _ in range(count)) + "@" + realm
