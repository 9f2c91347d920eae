"""Files that report how much of themselves a reader asked for."""

from __future__ import annotations

import io


def counting_file(reads: list[int]) -> type[io.FileIO]:
    """An opener (`opener(path)`) whose files append the length of every read to `reads`: the check that
    a scan skips payloads rather than reading them."""

    class CountingFile(io.FileIO):
        def read(self, size=-1):
            data = super().read(size)
            reads.append(len(data))
            return data

    return CountingFile
