"""Input listing and result part files of batch scoring (no model needed)."""

from __future__ import annotations

import os
import subprocess

import fsspec
import pytest

from service.scoring.results import OutputError, ResultStore, output_format
from service.scoring.sources import InputError, list_inputs, read_manifest


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def test_folder_is_walked_recursively_and_only_images_are_taken(tmp_path):
    a = _touch(tmp_path / "a.jpg")
    b = _touch(tmp_path / "sub" / "deeper" / "b.PNG", b"xyz")
    _touch(tmp_path / "notes.txt")
    files = list_inputs(str(tmp_path))
    assert [f.path for f in files] == sorted([a, b])
    assert {f.path: f.size for f in files}[b] == 3
    assert all(f.mtime > 0 for f in files)
    assert len(list_inputs(str(tmp_path), all_files=True)) == 3


def test_glob_and_manifests(tmp_path):
    a = _touch(tmp_path / "a.jpg")
    b = _touch(tmp_path / "b.jpg")
    assert [f.path for f in list_inputs(str(tmp_path / "*.jpg"))] == [a, b]
    (tmp_path / "list.txt").write_text("# images\na.jpg\n" + b + "\nmissing.jpg\n")
    listed = list_inputs(str(tmp_path / "list.txt"))
    assert [f.path for f in listed] == sorted([a, b, str(tmp_path / "missing.jpg")])
    assert {f.path: f.size for f in listed}[str(tmp_path / "missing.jpg")] == -1  # gets an error row later
    (tmp_path / "list.csv").write_text("label,path\ncat,a.jpg\ndog,b.jpg\n")
    assert [f.path for f in list_inputs(str(tmp_path / "list.csv"))] == [a, b]
    assert read_manifest("x.jpg,1\ny.jpg,2\n") == ["x.jpg", "y.jpg"]


def test_bad_inputs_are_refused_with_a_reason(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list_inputs(str(tmp_path / "nope"))
    with pytest.raises(InputError, match="matches no file"):
        list_inputs(str(tmp_path / "*.jpg"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image"):
        list_inputs(str(tmp_path / "empty"))


def test_memory_filesystem_folder_glob_and_manifest():
    fs = fsspec.filesystem("memory")
    fs.pipe("/src/one.jpg", b"1")
    fs.pipe("/src/nested/two.jpg", b"22")
    fs.pipe("/src/list.txt", b"one.jpg\nnested/two.jpg\n")
    try:
        paths = [f.path for f in list_inputs("memory://src")]
        assert paths == ["memory:///src/nested/two.jpg", "memory:///src/one.jpg"]
        assert [f.path for f in list_inputs("memory://src/*.jpg")] == ["memory:///src/one.jpg"]
        assert [f.path for f in list_inputs("memory://src/list.txt")] == paths
    finally:
        fs.rm("/src", recursive=True)


def _row(path, error=""):
    return {
        "path": path,
        "size": 1,
        "mtime": 2.0,
        "model": "m",
        "version": "1",
        "top_k_indices": [3, 1],
        "top_k_ids": ["c", "a"],
        "top_k_labels": ["cat", "ant"],
        "top_k_probabilities": [0.75, 0.25],
        "error": error,
    }


@pytest.mark.parametrize("ext", [".parquet", ".csv", ".jsonl"])
def test_parts_round_trip_and_drop(tmp_path, ext):
    store = ResultStore(str(tmp_path / f"out{ext}"))
    store.prepare()
    store.write_chunk([_row("a"), _row("b", "invalid_image: not an image")])
    store.write_chunk([_row("c")])
    assert sorted(r["path"] for r in store.read_all()) == ["a", "b", "c"]
    assert store.read_all()[0] == _row("a")
    done = store.done()
    assert done["b"]["error"].startswith("invalid_image")
    store.drop(["a", "c"], done)
    assert [r["path"] for r in store.read_all()] == ["b"]
    assert not [n for n in os.listdir(store.root) if n.startswith(".")]


def test_extension_picks_the_format():
    assert output_format("x.parquet") == "parquet"
    assert output_format("s3://b/x.jsonl/") == "jsonl"
    with pytest.raises(ValueError, match="extension"):
        output_format("x.xlsx")


def test_temp_files_of_a_killed_run_are_removed(tmp_path):
    store = ResultStore(str(tmp_path / "out.parquet"))
    store.prepare()
    (tmp_path / "out.parquet" / ".tmp-part-x.parquet").write_bytes(b"half")
    ResultStore(str(tmp_path / "out.parquet")).prepare()
    assert os.listdir(tmp_path / "out.parquet") == []


def test_output_that_is_a_file_or_under_a_file_is_refused(tmp_path):
    (tmp_path / "f.parquet").write_bytes(b"")
    with pytest.raises(OutputError, match="is a file"):
        ResultStore(str(tmp_path / "f.parquet")).prepare()
    with pytest.raises(OutputError, match="cannot write"):
        ResultStore(str(tmp_path / "f.parquet" / "out.csv")).prepare()


def _can_mount() -> bool:
    return os.geteuid() == 0 and subprocess.run(["which", "mount"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_mount(), reason="needs root to mount a small tmpfs")
def test_full_disk_gives_a_clear_error_and_earlier_parts_stay_readable(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("tmpfs mount refused")
    try:
        store = ResultStore(str(mnt / "out.jsonl"))
        store.prepare()
        store.write_chunk([_row("a")])
        big = [_row("p" * 4000 + str(i)) for i in range(40)]
        with pytest.raises(OutputError, match="No space left"):
            store.write_chunk(big)
        assert [r["path"] for r in store.read_all()] == ["a"]
        assert not [n for n in os.listdir(mnt / "out.jsonl") if n.startswith(".")]
    finally:
        subprocess.run(["umount", str(mnt)])


def test_awkward_names_and_spellings(tmp_path):
    """A folder named like a glob is a folder; `./a.jpg` and `a.jpg` are one file; `a::b.jpg` is a file name,
    not fsspec's URL chaining; a manifest's `path` header and BOM are headers, commas in a .txt are names."""
    from service.scoring.sources import open_bytes

    folder = tmp_path / "photos [2024]"
    a = _touch(folder / "a.jpg")
    assert [f.path for f in list_inputs(str(folder))] == [a]
    colons = _touch(tmp_path / "c" / "a::b.jpg", b"abc")
    assert open_bytes(colons, 100) == b"abc"
    (folder / "list.txt").write_text("a.jpg\n./a.jpg\nx,y.jpg\n")
    assert [f.path for f in list_inputs(str(folder / "list.txt"))] == sorted([a, str(folder / "x,y.jpg")])
    (folder / "one.csv").write_text("\ufeffpath\na.jpg\n")
    assert [f.path for f in list_inputs(str(folder / "one.csv"))] == [a]
    assert read_manifest("path\nx.jpg\n") == ["x.jpg"]


def test_the_output_folder_inside_the_input_is_not_listed(tmp_path):
    a = _touch(tmp_path / "a.jpg")
    _touch(tmp_path / "scores.jsonl" / "part-1-00001.jsonl", b"{}\n")
    _touch(tmp_path / ".tmp-part-2.jsonl")
    listed = list_inputs(str(tmp_path), all_files=True, exclude=str(tmp_path / "scores.jsonl"))
    assert [f.path for f in listed] == [a]


def test_a_file_name_that_is_not_utf8_is_written_escaped(tmp_path):
    """Latin-1 bytes in a Linux name once aborted a Parquet job (the row could not be encoded)."""
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg")
    with open(raw, "wb") as f:
        f.write(b"x")
    (listed,) = list_inputs(str(tmp_path))
    assert listed.name == str(tmp_path / "caf\\xe9.jpg") and listed.name.encode("utf-8")
    assert listed.key[0] == listed.name
