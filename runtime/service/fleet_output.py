"""Where a fleet replay writes its decisions, and what counts as a finished node.

- a folder (``--out DIR/``, or an existing folder): one ``<node>.jsonl`` per
  node. A node's lines go to ``.<node>.jsonl.partial`` as they arrive; when
  its last part is written the file is flushed, fsynced and renamed to
  ``<node>.jsonl`` (then the folder is fsynced). The rename is the done
  marker: a ``<node>.jsonl`` is complete, whatever stopped the run, and
  ``--resume`` skips exactly those nodes. A node whose input failed midway
  keeps its readable decisions as ``<node>.jsonl.failed`` and is retried by
  ``--resume``;
- a file or ``-`` (stdout): every part as it arrives, whole lines, nodes
  interleaved (sort by node and seq to compare); no resume.

Node names become file names through ``urllib.parse.quote`` (no ``/``, no
leading dot).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TextIO
from urllib.parse import quote, unquote

from edgefuse.runtime.core.errors import ConfigError

SUFFIX = ".jsonl"


def is_folder_target(out: str) -> bool:
    return out != "-" and (out.endswith(("/", os.sep)) or os.path.isdir(out))


def node_file_name(node: str) -> str:
    name = quote(node, safe="")
    if name.startswith("."):  # not a hidden file (those are the partial ones)
        name = "%2E" + name[1:]
    return name + SUFFIX


class FolderOutput:
    """One file per node; see the module docstring."""

    def __init__(self, folder: str | os.PathLike, resume: bool):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the output folder {self.folder}: "
                              f"{exc.strerror or exc}; choose a writable --out DIR") from exc
        done = self.complete_nodes()
        if done and not resume:
            raise ConfigError(f"{self.folder} already holds the decisions of {len(done)} "
                              "node(s); pass --resume to finish that run (finished nodes are "
                              "skipped) or choose an empty folder")
        self._open: dict[str, TextIO] = {}

    def complete_nodes(self) -> set[str]:
        return {unquote(p.name[:-len(SUFFIX)]) for p in self.folder.glob("*" + SUFFIX)
                if not p.name.startswith(".")}

    def _paths(self, node: str) -> tuple[Path, Path]:
        name = node_file_name(node)
        return self.folder / name, self.folder / f".{name}.partial"

    def write(self, node: str, text: str) -> None:
        fh = self._open.get(node)
        if fh is None:
            partial = self._paths(node)[1]
            fh = self._open[node] = open(partial, "w", encoding="utf-8")  # noqa: SIM115
        fh.write(text)

    def finish(self, node: str, ok: bool) -> None:
        """The node's last part is in: make its file complete (ok) or failed."""
        self.write(node, "")  # a node that decided nothing still gets its (empty) file
        fh = self._open.pop(node)
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        final, partial = self._paths(node)
        os.replace(partial, final if ok else final.with_name(final.name + ".failed"))
        if ok:
            stale = final.with_name(final.name + ".failed")
            stale.unlink(missing_ok=True)
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Leave unfinished nodes as .partial (a resumed run rewrites them)."""
        for fh in self._open.values():
            fh.close()
        self._open.clear()


class StreamOutput:
    """Parts as they arrive into one file or stdout."""

    def __init__(self, out: str):
        if out == "-":
            self._fh, self._own = sys.stdout, False
        else:
            try:
                self._fh, self._own = open(out, "w", encoding="utf-8"), True  # noqa: SIM115
            except OSError as exc:
                raise ConfigError(f"cannot write decisions to {out}: {exc.strerror}; choose a "
                                  "writable path, a folder (--out DIR/) or - for stdout") from exc

    def complete_nodes(self) -> set[str]:
        return set()

    def write(self, node: str, text: str) -> None:
        self._fh.write(text)

    def finish(self, node: str, ok: bool) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.flush()
        if self._own:
            self._fh.close()


def open_output(out: str, resume: bool) -> FolderOutput | StreamOutput:
    if is_folder_target(out):
        return FolderOutput(out, resume)
    if resume:
        raise ConfigError(f"--resume needs a folder for --out (one file per node, renamed "
                          f"when complete), found {out!r}; e.g. --out decisions/")
    return StreamOutput(out)
