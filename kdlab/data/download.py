"""Fetch a dataset archive over HTTP(S), check its md5 and unpack it safely.

``download_file`` (and ``download_and_extract``, which uses it) streams a file to a temporary
file next to its final place, checks the md5 while it downloads, and only then renames it
into place (atomically), so an interrupted or corrupt download never leaves a file that
looks complete. Extraction goes to a temporary directory first and its top-level entries
are renamed into ``dest_dir``, and members with absolute paths, ``..`` components, links
leaving the tree or device files are refused. Every failure is a one-line ``DatasetError``
naming the URL and what to do.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath

from ..errors import KdlabError

_CHUNK = 1 << 20
_TIMEOUT = 60.0


class DatasetError(KdlabError, RuntimeError):
    """A dataset could not be found, downloaded, verified or unpacked."""


def _one_line(error: BaseException | str) -> str:
    """An exception's text with all whitespace runs (newlines included) collapsed."""
    return " ".join(str(error).split())


def md5sum(path: str | os.PathLike, chunk_size: int = _CHUNK) -> str:
    """Hex md5 digest of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def download_and_extract(url: str, md5: str, dest_dir: str | os.PathLike,
                         filename: str | None = None, progress: bool = True) -> Path:
    """Download ``url`` into ``dest_dir`` (unless already there with the right md5),
    verify it and extract the tar(.gz) archive into ``dest_dir``. Returns the archive path.
    """
    dest = Path(dest_dir).expanduser()
    filename = filename or PurePosixPath(urllib.parse.urlparse(url).path).name
    if not filename:
        raise DatasetError(f"cannot infer an archive file name from {url}; pass filename=")
    archive = dest / filename
    md5 = md5.lower()
    if not (archive.is_file() and md5sum(archive) == md5):
        download_file(url, md5, archive, progress)
    extract_archive(archive, dest, url=url)
    return archive


# -- download ------------------------------------------------------------------------------
def download_file(url: str, md5: str, path: str | os.PathLike, progress: bool = True) -> Path:
    """Download ``url`` to ``path`` (its folder is created), checking the md5 of the bytes
    received; ``path`` appears only once they are complete and verified."""
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"cannot create the data directory {path.parent} for {url}: "
                           f"{_one_line(e)}; choose a writable dataset.root") from None
    _download(url, md5.lower(), path, progress)
    return path


def _download(url: str, md5: str, archive: Path, progress: bool) -> None:
    manual = f"or download it by hand and place it at {archive}"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{archive.name}.", suffix=".part",
                                    dir=archive.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        request = urllib.request.Request(url, headers={"User-Agent": "kdlab"})
        with os.fdopen(fd, "wb") as out, \
                urllib.request.urlopen(request, timeout=_TIMEOUT) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            bar = _progress_bar(total, archive.name, enabled=progress)
            received = 0
            try:
                while block := response.read(_CHUNK):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
                    received += len(block)
            finally:
                bar.close()
        if total is not None and received != total:
            raise DatasetError(f"download of {url} failed: incomplete, got {received} of "
                               f"{total} bytes; retry, {manual}")
        actual = digest.hexdigest()
        if actual != md5:
            raise DatasetError(f"md5 mismatch for {url}: expected {md5}, got {actual}; the "
                               f"download is corrupt or the file changed upstream - retry, "
                               f"{manual}")
        os.replace(tmp, archive)
    except DatasetError:
        raise
    except urllib.error.HTTPError as e:
        raise DatasetError(f"download of {url} failed: HTTP {e.code} {_one_line(e.reason)}; "
                           f"check the URL, {manual}") from None
    except urllib.error.URLError as e:
        raise DatasetError(f"download of {url} failed: {_one_line(e.reason)}; check the "
                           f"network/proxy, {manual}") from None
    except (OSError, http.client.HTTPException) as e:  # timeouts, cut connections, disk full
        raise DatasetError(f"download of {url} failed: {type(e).__name__}: {_one_line(e)}; "
                           f"retry, {manual}") from None
    except ValueError as e:  # malformed URL
        raise DatasetError(f"cannot download {url}: {_one_line(e)}; check dataset.url") from None
    finally:
        if tmp.exists():
            tmp.unlink()


class _PlainProgress:
    """Fallback when tqdm is absent: a percentage (or MB count) on stderr every ~10%."""

    def __init__(self, total: int | None, name: str):
        self.total, self.name, self.done, self.shown = total, name, 0, -1

    def update(self, n: int) -> None:
        self.done += n
        if self.total:
            step = min(100, 100 * self.done // self.total) // 10
            text = f"{10 * step}%"
        else:
            step = self.done // (10 * _CHUNK)
            text = f"{self.done / 2**20:.0f} MB"
        if step != self.shown:
            self.shown = step
            print(f"\rdownloading {self.name}: {text}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.shown >= 0:
            print(file=sys.stderr, flush=True)


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int | None, name: str, enabled: bool):
    if not enabled:
        return _NoProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainProgress(total, name)
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                desc=f"downloading {name}", leave=False)


# -- extraction ----------------------------------------------------------------------------
def _unsafe_reason(member: tarfile.TarInfo) -> str | None:
    """Why a member must not be extracted, or None if it is a plain file/dir inside the tree."""
    name = PurePosixPath(member.name)
    if member.name.startswith(("/", "\\")) or name.is_absolute():
        return "absolute path"
    if ".." in name.parts or ".." in member.name.split("\\"):
        return "'..' in path"
    if member.issym() or member.islnk():
        target = PurePosixPath(member.linkname)
        if target.is_absolute() or member.linkname.startswith("\\"):
            return "link to an absolute path"
        base = name.parent if member.issym() else PurePosixPath()
        depth = 0
        for part in (base / target).parts:
            depth += -1 if part == ".." else (0 if part == "." else 1)
            if depth < 0:
                return "link leaving the archive"
    elif not (member.isfile() or member.isdir()):
        return "device or special file"
    return None


def extract_archive(archive: str | os.PathLike, dest_dir: str | os.PathLike,
                    url: str | None = None) -> None:
    """Safely extract a tar(.gz/.bz2/.xz) archive into ``dest_dir``.

    Members are extracted into a temporary directory inside ``dest_dir``; each top-level
    entry then replaces any existing entry of the same name, so a half-finished earlier
    extraction is overwritten and an interrupted one leaves no partial tree behind.
    """
    archive, dest = Path(archive), Path(dest_dir)
    origin = url or str(archive)
    redo = f"delete {archive} and retry, or extract it by hand into {dest}"
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = tar.getmembers()
                for member in members:
                    reason = _unsafe_reason(member)
                    if reason:
                        raise DatasetError(f"refusing to extract {archive} (from {origin}): "
                                           f"member {member.name!r} has {reason}; {redo}")
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp, members=members, filter="data")
                else:  # Python < 3.11.4: the members were vetted above
                    tar.extractall(tmp, members=members)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DatasetError(f"bad archive {archive} (from {origin}): {_one_line(e)}; "
                               f"{redo}") from None
        for entry in sorted(tmp.iterdir()):
            target = dest / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(entry, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
