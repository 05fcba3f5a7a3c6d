"""The shared fixtures are real servers: etcd v3 and an S3 endpoint."""
import threading
import time

import pytest


def test_etcd_put_get_and_prefix(etcd_server, etcd_prefix):
    client = etcd_server.client()
    client.put(etcd_prefix + "a", "1")
    client.put(etcd_prefix + "b", "2")
    value, _meta = client.get(etcd_prefix + "a")
    assert value == b"1"
    got = sorted((m.key.decode(), v) for v, m in client.get_prefix(etcd_prefix))
    assert got == [(etcd_prefix + "a", b"1"), (etcd_prefix + "b", b"2")]


def test_etcd_lease_expiry_removes_key(etcd_server, etcd_prefix):
    client = etcd_server.client()
    lease = client.lease(ttl=1)
    client.put(etcd_prefix + "alive", "yes", lease=lease)
    assert client.get(etcd_prefix + "alive")[0] == b"yes"
    deadline = time.monotonic() + 15
    while client.get(etcd_prefix + "alive")[0] is not None:
        assert time.monotonic() < deadline, "key outlived its 1 s lease"
        time.sleep(0.1)


def test_etcd_watch_sees_put(etcd_server, etcd_prefix):
    client = etcd_server.client()
    seen = []
    done = threading.Event()

    def callback(response):
        for event in response.events:
            seen.append(event.key.decode())
        done.set()

    watch_id = client.add_watch_prefix_callback(etcd_prefix, callback)
    try:
        client.put(etcd_prefix + "w", "x")
        assert done.wait(15), "watch saw nothing"
        assert seen == [etcd_prefix + "w"]
    finally:
        client.cancel_watch(watch_id)


def test_etcd_server_can_be_killed(etcd_server_fn):
    import pyetcd

    client = etcd_server_fn.client()
    client.put("/k", "v")
    etcd_server_fn.stop()
    with pytest.raises(pyetcd.exceptions.ConnectionFailedError):
        pyetcd.client(host=etcd_server_fn.host, port=etcd_server_fn.port, timeout=2).get("/k")


def test_s3_write_list_read(s3_bucket):
    import fsspec

    bucket, options = s3_bucket
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    with fs.open(f"{bucket}/dir/a.bin", "wb") as f:
        f.write(b"\x00\x01" * 1000)
    fs.pipe(f"{bucket}/dir/b.txt", b"hello")
    assert sorted(fs.ls(f"{bucket}/dir", detail=False)) == [f"{bucket}/dir/a.bin", f"{bucket}/dir/b.txt"]
    assert fs.cat(f"{bucket}/dir/b.txt") == b"hello"
    assert fs.size(f"{bucket}/dir/a.bin") == 2000
    # A second, independent client sees the same objects: the data lives in the server.
    with fsspec.open(f"s3://{bucket}/dir/b.txt", "rb", **options) as f:
        assert f.read() == b"hello"


def test_s3_buckets_are_fresh(s3_server, s3_bucket):
    bucket, _ = s3_bucket
    assert s3_server.filesystem().ls(bucket) == []
