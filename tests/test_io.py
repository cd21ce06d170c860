import os
import stat

import pytest

from moegate.io import atomic_dir, atomic_path, write_json


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("{half")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_dir_keeps_the_previous_version(tmp_path):
    target = tmp_path / "router"
    with atomic_dir(target) as d:
        (d / "model.safetensors").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            (d / "model.safetensors").write_text("v2-partial")
            raise RuntimeError("killed")
    assert (target / "model.safetensors").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["router"]


def test_outputs_get_umask_modes_not_private_temp_modes(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    write_json(tmp_path / "m.json", {"a": 1})
    with atomic_dir(tmp_path / "d") as d:
        (d / "f").write_text("x")
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~mask


def test_replacing_a_directory_never_leaves_it_missing(tmp_path):
    """A reader polling the directory while it is replaced over and over always finds a whole version."""
    import threading

    from moegate import io

    target = tmp_path / "router"
    with atomic_dir(target) as d:
        (d / "config.json").write_text("0")
        (d / "model.safetensors").write_text("0")
    if not io._exchange(target, target):  # exchanging a path with itself is a no-op where it is supported
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this kernel or file system")
    seen, missing, stop = [], [], threading.Event()

    def read():  # the way Router.from_pretrained reads: file by file, then checks the directory is the same one
        while not stop.is_set():
            with io.pinned_dir(target) as unchanged:
                try:
                    files = (target / "config.json").read_text(), (target / "model.safetensors").read_text()
                except FileNotFoundError as e:  # the path named no directory for a moment
                    missing.append(e)
                    continue
                if unchanged():
                    seen.append(files[0] == files[1])

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for version in range(1, 200):
            with atomic_dir(target) as d:
                (d / "config.json").write_text(str(version))
                (d / "model.safetensors").write_text(str(version))
    finally:
        stop.set()
        reader.join()
    assert not missing and seen and all(seen)  # two versions mixed would be a False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["router"]


def test_without_an_atomic_exchange_a_reader_waits_out_the_gap(tmp_path, monkeypatch):
    import threading
    import time

    from moegate import io

    monkeypatch.setattr(io, "_exchange", lambda a, b: False)  # NFS, GPFS: two renames
    target = tmp_path / "router"
    for version in ("v1", "v2"):
        with atomic_dir(target) as d:
            (d / "f").write_text(version)
    assert (target / "f").read_text() == "v2" and sorted(p.name for p in tmp_path.iterdir()) == ["router"]

    # the moment between the renames, held open: the old version is aside, the new one not yet in
    aside = tmp_path / ".router.old"
    target.rename(aside)
    threading.Timer(0.2, lambda: (tmp_path / "router").mkdir()).start()
    t0 = time.monotonic()
    io.wait_for_swap(target)
    assert target.is_dir() and 0.15 < time.monotonic() - t0 < 1.5
    # a job killed in that moment: the next write cleans the parked version up
    target.rmdir()
    with atomic_dir(target) as d:
        (d / "f").write_text("v3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["router"]
