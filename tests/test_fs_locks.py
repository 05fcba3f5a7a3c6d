"""elastic.fs and elastic.locks: the URL and flock plumbing checkpoint and dataload share."""
from __future__ import annotations

import os
import pathlib
import socket

import pytest

from elastic import fs, locks
from elastic.errors import ConfigError, ElasticError


class BadURL(ConfigError):
    pass


class Down(ElasticError):
    pass


def test_local_paths_and_file_urls(tmp_path):
    for url in (str(tmp_path) + "/", pathlib.Path(tmp_path), f"file://{tmp_path}"):
        f, root = fs.open_url(url)
        assert fs.is_local(f) and root == str(tmp_path)
    f, root = fs.open_url("memory://bucket/x/")
    assert not fs.is_local(f) and root.rstrip("/").endswith("bucket/x")
    assert fs.open_url("/")[1] == "/"  # the root stays a path


def test_bad_urls_raise_the_callers_class():
    for url in ("", "  ", None, 3):
        with pytest.raises(BadURL, match="dataset URL must be a non-empty string"):
            fs.open_url(url, what="dataset", bad_url=BadURL)
    with pytest.raises(BadURL, match="Protocol not known: nope"):
        fs.open_url("nope://x", bad_url=BadURL)
    with pytest.raises(ConfigError):  # the default class
        fs.open_url("nope://x")
    pytest.importorskip("s3fs")
    with pytest.raises(BadURL, match=r"s3://: names no bucket; use s3://BUCKET\[/PREFIX\]"):
        fs.open_url("s3://", bad_url=BadURL)


def test_a_filesystem_that_cannot_start_raises_unavailable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(Down, match=f"ftp://127.0.0.1:{port}/x: cannot open the storage: "):
            fs.open_url(f"ftp://127.0.0.1:{port}/x", unavailable=Down)


def test_why_is_one_line():
    assert fs.why(OSError("disk\nfull")) == "OSError: disk"
    assert fs.why(TimeoutError()) == "TimeoutError"


def test_try_lock_exclusive_and_shared(tmp_path):
    path = str(tmp_path / "x.lock")
    a = os.open(path, os.O_CREAT | os.O_RDWR)
    b = os.open(path, os.O_RDWR)
    try:
        assert locks.try_lock(a, shared=True) and locks.try_lock(b, shared=True)
        assert not locks.is_unlocked(path)
        os.close(b)
        b = os.open(path, os.O_RDWR)
        assert not locks.try_lock(b)  # a still holds it shared
        os.close(a)
        a = -1
        assert locks.try_lock(b) and not locks.is_unlocked(path)
    finally:
        for fd in (a, b):
            if fd >= 0:
                os.close(fd)
    assert locks.is_unlocked(path)


def test_exclusive_waits_at_most_its_timeout(tmp_path):
    path = str(tmp_path / "y.lock")
    with locks.exclusive(path):
        assert not locks.is_unlocked(path)
        with pytest.raises(Down, match="timed out after 0.01s waiting for"):
            with locks.exclusive(path, timeout_s=0.01, error=Down):
                pass
        with pytest.raises(locks.LockTimeoutError):
            with locks.exclusive(path, timeout_s=0):
                pass
    with locks.exclusive(path, timeout_s=0):  # free again once the holder leaves
        pass
    assert issubclass(locks.LockTimeoutError, (ElasticError, TimeoutError))
