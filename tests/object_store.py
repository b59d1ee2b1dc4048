"""A Beam file system with an object store's semantics, for tests (GCS and S3 cannot be
reached here).

`objstore://bucket/key` is kept in a local folder (`ObjectStoreFileSystem.root`), but the
file system behaves like GCS through Beam: no folders (a folder is a key prefix; listing
is by prefix; `mkdirs` does nothing; a path "exists" only as an object), and a rename is
a copy followed by a delete, file by file. Defining the class registers the scheme with
Beam's `FileSystems` in this process (use an in-process runner).
"""
from __future__ import annotations

import os
import shutil

from apache_beam.io.filesystem import BeamIOError, FileMetadata
from apache_beam.io.localfilesystem import LocalFileSystem

SCHEME = "objstore"


class ObjectStoreFileSystem(LocalFileSystem):
    root: str | None = None  # set by the test
    renames = 0  # files moved (copy + delete), for the tests

    @classmethod
    def scheme(cls):
        return SCHEME

    def _local(self, url: str) -> str:
        prefix = SCHEME + "://"
        if not url.startswith(prefix) or self.root is None:
            raise BeamIOError(f"not an {SCHEME} path (or no root): {url}")
        return os.path.join(self.root, url[len(prefix):])

    def join(self, basepath, *paths):
        return "/".join([basepath.rstrip("/")] + [p.strip("/") for p in paths])

    def split(self, path):
        head, _, tail = path.rstrip("/").rpartition("/")
        return head, tail

    def has_dirs(self):
        return False

    def mkdirs(self, path):
        pass

    def _objects(self):
        for d, _, files in os.walk(self.root):
            for f in files:
                local = os.path.join(d, f)
                yield SCHEME + "://" + os.path.relpath(local, self.root).replace(os.sep, "/"), local

    def _list(self, dir_or_prefix):
        for url, local in self._objects():
            if url.startswith(dir_or_prefix):
                yield FileMetadata(url, os.path.getsize(local), os.path.getmtime(local))

    def exists(self, path):
        return os.path.isfile(self._local(path))

    def size(self, path):
        return os.path.getsize(self._local(path))

    def last_updated(self, path):
        return os.path.getmtime(self._local(path))

    def checksum(self, path):
        return str(self.size(path))

    def metadata(self, path):
        local = self._local(path)
        if not os.path.isfile(local):
            raise BeamIOError(f"Path does not exist: {path}")
        return FileMetadata(path, os.path.getsize(local), os.path.getmtime(local))

    def create(self, path, mime_type="application/octet-stream", compression_type="auto"):
        return super().create(self._local(path), mime_type, compression_type)

    def open(self, path, mime_type="application/octet-stream", compression_type="auto"):
        return super().open(self._local(path), mime_type, compression_type)

    def copy(self, source_file_names, destination_file_names):
        for src, dst in zip(source_file_names, destination_file_names):
            local = self._local(dst)
            os.makedirs(os.path.dirname(local), exist_ok=True)
            shutil.copyfile(self._local(src), local)

    def rename(self, source_file_names, destination_file_names):
        for src, dst in zip(source_file_names, destination_file_names):
            self.copy([src], [dst])
            os.remove(self._local(src))
            type(self).renames += 1

    def delete(self, paths):
        # like GCS: an object, or with a trailing "/" every object under the prefix
        for path in paths:
            if path.endswith("/"):
                for url, local in list(self._objects()):
                    if url.startswith(path):
                        os.remove(local)
            elif os.path.isfile(self._local(path)):
                os.remove(self._local(path))
            else:
                raise BeamIOError("Delete operation failed", {path: FileNotFoundError(path)})


def objects(root: str) -> list[str]:
    """Every object's key under `root` (the bucket folders' files), sorted."""
    return sorted(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
                  for d, _, files in os.walk(root) for f in files)
