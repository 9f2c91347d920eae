"""Reads the member headers of a tar file, skipping payloads: the scan behind every shard index.

Webdataset shards are plain POSIX ustar archives, so the fast reader decodes each
512-byte header from a few named fields; any other kind of header (long names, pax
or GNU extensions, a bad checksum) hands the whole file to `tarfile` instead.
"""

from __future__ import annotations

import tarfile

BLOCK = 512  # headers and payloads are laid out in blocks of this size

# POSIX ustar header fields (IEEE Std 1003.1, pax format), as slices of the 512-byte block.
NAME = slice(0, 100)
SIZE = slice(124, 136)  # octal text; a first byte with its high bit set marks base-256 (GNU, > 8 GiB)
CHECKSUM = slice(148, 156)  # octal sum of all header bytes, counting this field as spaces
TYPEFLAG = slice(156, 157)
MAGIC = slice(257, 263)  # "ustar\0" (POSIX) or "ustar " (GNU)
PREFIX = slice(345, 500)  # directories before NAME, for paths longer than 100 bytes

_CHECKSUM_AS_SPACES = (CHECKSUM.stop - CHECKSUM.start) * ord(" ")
_PLAIN_TYPES = {b"0": True, b"\0": True, b"5": False}  # regular file (two spellings), directory

# (header offset, member name, payload offset, payload size, is a regular file)
Member = tuple[int, str, int, int, bool]


class _NotPlain(Exception):
    """A header the fast reader leaves to tarfile (long names, pax, bad checksum, ...)."""


class TarCut(tarfile.ReadError):
    """The archive stops without its all-zero end block: truncated or damaged."""


def padded(offset: int) -> int:
    """`offset` rounded up to a whole block."""
    return -(-offset // BLOCK) * BLOCK


def _plain_header(header: bytes, offset: int) -> Member:
    """Decodes a plain ustar header: a few slices instead of tarfile's general machinery."""
    is_file = _PLAIN_TYPES.get(header[TYPEFLAG])
    if is_file is None or not header[MAGIC].startswith(b"ustar") or header[SIZE.start] & 0x80:
        raise _NotPlain
    try:
        size = int(header[SIZE].strip(b" \0") or b"0", 8)
        checksum = int(header[CHECKSUM].strip(b" \0"), 8)
    except ValueError:
        raise _NotPlain from None
    if checksum != sum(header) - sum(header[CHECKSUM]) + _CHECKSUM_AS_SPACES:
        raise _NotPlain
    name = header[NAME].split(b"\0", 1)[0]
    prefix = header[PREFIX].split(b"\0", 1)[0]
    name = (prefix + b"/" + name if prefix else name).decode("utf-8", errors="surrogateescape")
    return offset, name, offset + BLOCK, size, is_file


def plain_members(fileobj, end: int, expect_end_block: bool = True):
    """Members of a tar made of plain ustar headers (raises _NotPlain at any other kind)."""
    offset = 0
    while offset < end:
        fileobj.seek(offset)
        header = fileobj.read(BLOCK)
        if len(header) < BLOCK:
            raise TarCut
        if not header.strip(b"\0"):
            return
        member = _plain_header(header, offset)
        yield member
        offset = member[2] + padded(member[3])
    if expect_end_block:
        raise TarCut


def tarfile_members(fileobj, expect_end_block: bool = True):
    """Members of any tar that tarfile reads; headers only, payloads are skipped."""
    archive = tarfile.open(fileobj=fileobj, mode="r:")
    while True:
        try:
            info = archive.next()
        except (tarfile.ReadError, EOFError):
            raise TarCut from None  # header or payload past the end of the file
        if info is None:
            fileobj.seek(archive.offset)
            block = fileobj.read(BLOCK)
            if not expect_end_block or (len(block) == BLOCK and not block.strip(b"\0")):
                return
            raise TarCut
        archive.members.clear()  # headers only; do not keep 600k TarInfos of a 3 GB shard
        yield info.offset, info.name, info.offset_data, info.size, info.isfile()


def members_of(fileobj, end: int, expect_end_block: bool = True, consume=list):
    """`consume(member iterator)`, by the fast reader where it can, else by tarfile from the start."""
    try:
        return consume(plain_members(fileobj, end, expect_end_block))
    except _NotPlain:
        fileobj.seek(0)
        return consume(tarfile_members(fileobj, expect_end_block))
