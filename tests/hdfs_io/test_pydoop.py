"""pydoop.hdfs, built by the setup against the Maven Hadoop jars, on the real local HDFS."""

from __future__ import annotations

from hdfs_io.fs.filesystem import open_filesystem


def test_pydoop_lists_and_reads_a_file_written_through_pyarrow(cluster, hdfs_dir):
    import pydoop.hdfs as phdfs

    fs, path = open_filesystem(f"{hdfs_dir}/shared.bin")
    payload = b"\x00speech\xff" * 5000
    with fs.open_output_stream(path) as f:
        f.write(payload)

    listed = phdfs.ls(hdfs_dir)
    data = phdfs.load(f"{hdfs_dir}/shared.bin", mode="rb")

    assert [p.rsplit("/", 1)[1] for p in listed] == ["shared.bin"]
    assert data == payload


def test_pydoop_writes_a_file_that_pyarrow_reads(cluster, hdfs_dir):
    import pydoop.hdfs as phdfs

    phdfs.dump(b"written by pydoop", f"{hdfs_dir}/from_pydoop.txt", mode="wb")

    fs, path = open_filesystem(f"{hdfs_dir}/from_pydoop.txt")
    assert fs.open_input_stream(path).read() == b"written by pydoop"
