"""Listing and reading a source folder without being led astray: the files a conversion (or predict)
reads, each real file once, and nothing that could hang, walk the disk or leak what lies outside.

    tree = Tree("/datasets/flowers")
    listed = {cls: tree.list(f"train/{cls}") for cls in ("daisy", "rose")}   # first every real file
    items = tree.resolve(listed["daisy"])    # then the links: [(key, path or Skip(reason))]
    data = read_regular(path)                # bytes, or NotRegular / OSError; never blocks on a FIFO

The rules (README "What the converter does with links and special files"):
- only regular files are read; FIFOs, sockets and devices are skipped with their kind, unopened
  (a FIFO blocks its reader forever, a device may be endless);
- symbolic links are followed only while they stay inside the source folder; one leading outside
  (a link to `/`, to a home folder) is skipped, not followed, so a conversion never walks the disk
  nor stores files the folder does not hold;
- every real file is stored once: a link to a file or folder already listed (a loop such as
  `dog/loopdir -> .`, or a second name) is skipped, naming where the file is stored. Files reached
  without a link come first, so a file keeps the label of the folder it really lies in.
A skip is a reason, never a file's content.
"""

import os
import stat
from typing import NamedTuple

# Larger than any image under Pillow's pixel limit (89M pixels, 16-bit RGBA: 716 MB); a bigger file
# (a video, an archive) is not read into a task's memory at all.
MAX_FILE_BYTES = 1 << 30


class Skip(NamedTuple):
    """A listed name that is not read; `reason` goes to rejects.jsonl (or predict's error column)."""
    reason: str


class NotRegular(OSError):
    """Raised by read_regular for anything but a regular file; str() is the reason."""


def kind_of(mode):
    """What a file of st_mode `mode` is, in words."""
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path, what="file"):
    """Raise NotRegular (or OSError: missing) unless `path` (links followed) is a regular file."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegular(f"{path}: {kind_of(mode)}; expected a regular {what}")


def read_regular(path, limit=MAX_FILE_BYTES):
    """The bytes of the regular file at `path`. Raises NotRegular for a FIFO, socket, device or
    folder without opening it (stat first), and for a file over `limit` bytes; OSError otherwise.
    The open is non-blocking and checked again, in case the file was swapped after the stat."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegular(f"{kind_of(mode)}, not a regular file: not opened")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(f"{kind_of(st.st_mode)}, not a regular file: not read")
        if st.st_size > limit:
            raise NotRegular(f"{st.st_size:,} bytes, larger than any image ({limit:,} bytes at most): not read")
        return f.read(limit + 1)


class Tree:
    """The readable files under one source folder; see the module docstring for the rules."""

    def __init__(self, root):
        self.root = os.path.abspath(root)
        self.real = os.path.realpath(self.root)
        # (st_dev, st_ino) -> key: a file or folder is itself whatever its names (links, hard links)
        self.stored = {}
        self.folders = {}

    def inside(self, real):
        return real == self.real or real.startswith(self.real + os.sep)

    def list(self, rel):
        """Walk root/rel without following links. Returns [(key, path | Skip | Link)], keys relative
        to the root; regular files are claimed at once, links are left for resolve()."""
        out = []
        self._walk(os.path.join(self.root, rel), rel, out)
        return out

    def resolve(self, listed):
        """(key, path or Skip) for every entry of list(), links followed by the rules, sorted by key."""
        out = []
        for key, what in listed:
            if isinstance(what, _Link):
                self._follow(key, out)
            else:
                out.append((key, what))
        return sorted(out, key=lambda kv: kv[0])

    def _walk(self, folder, rel, out):
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in self.folders:
                out.append((rel, Skip(f"the same folder as {self.folders[st.st_dev, st.st_ino] or '.'}, "
                                      "which is read once")))
                return
            self.folders[st.st_dev, st.st_ino] = rel
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            out.append((rel, Skip(f"unreadable folder: {e.strerror or e}")))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue   # hidden, as torchvision's ImageFolder
            key = os.path.join(rel, entry.name)
            if entry.is_symlink():
                out.append((key, _Link()))
            elif entry.is_dir(follow_symlinks=False):
                self._walk(entry.path, key, out)
            else:
                out.append((key, self._claim(key, entry.path, entry.stat(follow_symlinks=False))))

    def _claim(self, key, path, st):
        if not stat.S_ISREG(st.st_mode):
            return Skip(f"{kind_of(st.st_mode)}, not a regular file: not opened")
        if (st.st_dev, st.st_ino) in self.stored:
            return Skip(f"the same file as {self.stored[st.st_dev, st.st_ino]}, which is stored once")
        self.stored[st.st_dev, st.st_ino] = key
        return os.path.realpath(path)

    def _follow(self, key, out):
        path = os.path.join(self.root, key)
        try:
            st = os.stat(path)
        except OSError as e:   # dangling, or a loop of links (ELOOP)
            out.append((key, Skip(f"unreadable: {e.strerror or e} (symbolic link)")))
            return
        if not self.inside(os.path.realpath(path)):
            out.append((key, Skip("symbolic link leading outside the source folder: not followed "
                                  "(links are followed only inside it)")))
        elif stat.S_ISDIR(st.st_mode):
            if (st.st_dev, st.st_ino) in self.folders:
                seen = self.folders[st.st_dev, st.st_ino] or "."
                out.append((key, Skip(f"symbolic link to a folder read already ({seen}): each file is stored once")))
                return
            more = []
            self._walk(path, key, more)
            out += self.resolve(more)
        else:
            out.append((key, self._claim(key, path, st)))


class _Link(NamedTuple):
    """A symbolic link found by list(), followed (or not) by resolve()."""
