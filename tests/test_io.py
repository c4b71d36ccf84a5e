"""Atomic writes: permissions kept, the umask read once, no stray temporary left after a killed writer."""

import os
import signal
import subprocess
import sys

import pytest

from prunekit.io import files as io


def test_a_replaced_file_keeps_its_mode_and_a_new_one_follows_the_umask(tmp_path):
    target = tmp_path / "plan.json"
    target.write_text("{}")
    os.chmod(target, 0o640)
    io.write_json(target, {"a": 1})
    assert target.stat().st_mode & 0o777 == 0o640
    fresh = tmp_path / "new.json"
    io.write_json(fresh, {})
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~io._UMASK


def test_the_umask_is_not_touched_while_writing(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or 0o022)
    io.write_json(tmp_path / "x.json", {})
    assert calls == []  # reading the umask means setting it: a race with other threads


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "scan.json"
    script = (
        "import sys, time\n"
        "from prunekit.io.files import atomic_write\n"
        "with atomic_write(sys.argv[1]) as f:\n"
        "    f.write('partial'); f.flush(); print('ready', flush=True); time.sleep(60)\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "ready"
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    strays = list(tmp_path.glob(".scan.json.*.tmp"))
    assert len(strays) == 1 and not target.exists()  # the kill left one behind, the target untouched
    io.write_json(target, {"done": True})
    assert list(tmp_path.glob(".scan.json.*.tmp")) == []
    assert io.read_json(target) == {"done": True}
