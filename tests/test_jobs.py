"""The output-folder lock of napo.jobs: held by real processes, refused naming the holder, stale locks taken over."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from napo.jobs import LOCK_NAME, OutputFolderBusy, lock_holder, output_lock, remove_temporary_files

# napo/jobs.py loaded on its own (no torch import: these helper processes start in a fraction of a second).
LOAD_JOBS = textwrap.dedent(f"""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("napo_jobs", {str(Path(__file__).parents[1] / "napo" / "jobs.py")!r})
    jobs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(jobs)
    output_lock, OutputFolderBusy = jobs.output_lock, jobs.OutputFolderBusy
""")
# Holds the lock of argv[1] until stdin closes; prints "locked" once it holds it.
HOLDER = LOAD_JOBS + textwrap.dedent("""
    with output_lock(sys.argv[1], command="holder job"):
        print("locked", flush=True)
        sys.stdin.read()
""")


def start_holder(folder: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_job_is_refused_naming_the_holder_pid_and_released_when_it_ends(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    holder = start_holder(folder)
    try:
        assert lock_holder(folder)["pid"] == holder.pid
        with pytest.raises(OutputFolderBusy, match=rf"pid {holder.pid} .*\(holder job\)") as error:
            with output_lock(folder):
                pytest.fail("entered a locked folder")
        assert error.value.holder["pid"] == holder.pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert holder.returncode == 0
    assert not (folder / LOCK_NAME).exists() and lock_holder(folder) is None
    with output_lock(folder):  # free again
        assert lock_holder(folder)["pid"] == os.getpid()


def test_a_stale_lock_of_a_killed_job_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "out"
    holder = start_holder(folder)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    recorded = json.loads((folder / LOCK_NAME).read_text())
    assert recorded["pid"] == holder.pid  # the file is still there, naming a dead process
    assert lock_holder(folder) is None
    with caplog.at_level(logging.WARNING, logger="napo.jobs"), output_lock(folder):
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"lock left by pid {holder.pid}" in caplog.text


def test_nested_locks_of_one_process_share_the_lock(tmp_path: Path) -> None:
    with output_lock(tmp_path / "out"):
        with output_lock(tmp_path / "out"):
            pass
        assert lock_holder(tmp_path / "out")["pid"] == os.getpid()  # still held by the outer block
    assert not (tmp_path / "out" / LOCK_NAME).exists()


def test_a_failed_job_removes_its_temporary_files_and_the_folder_it_created(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with output_lock(folder):
            (folder / "sub").mkdir()
            (folder / f"data.parquet.tmp-{os.getpid()}").write_text("half")
            (folder / "sub" / f"dataset.tmp-{os.getpid()}").mkdir()
            raise RuntimeError("boom")
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == ["sub"]  # the folder is not empty

    with pytest.raises(RuntimeError):
        with output_lock(tmp_path / "empty"):
            raise RuntimeError("before any write")
    assert not (tmp_path / "empty").exists()

    (tmp_path / "kept").mkdir()
    other = tmp_path / "kept" / "x.tmp-1"  # another process's: not ours to delete
    other.write_text("")
    with pytest.raises(KeyboardInterrupt):
        with output_lock(tmp_path / "kept"):
            raise KeyboardInterrupt
    assert other.exists() and (tmp_path / "kept").exists()
    assert remove_temporary_files(tmp_path / "kept", pid=1) == [other]


def test_an_unmakeable_folder_is_an_os_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        with output_lock(tmp_path / "file" / "out"):
            pass


def test_two_processes_racing_for_one_folder_never_both_hold_it(tmp_path: Path) -> None:
    """Six processes each take and release the lock 30 times, appending enter/leave marks: never two inside."""
    racer = LOAD_JOBS + textwrap.dedent("""
        import time
        done = 0
        while done < 30:
            try:
                with output_lock(sys.argv[1]):
                    with open(sys.argv[2], "a") as log:
                        log.write("enter\\n"); log.flush(); time.sleep(0.002); log.write("leave\\n")
                done += 1
            except OutputFolderBusy:
                time.sleep(0.001)
    """)
    log = tmp_path / "log.txt"
    processes = [subprocess.Popen([sys.executable, "-c", racer, str(tmp_path / "out"), str(log)]) for _ in range(6)]
    deadline = time.monotonic() + 240
    for process in processes:
        process.wait(timeout=max(1, deadline - time.monotonic()))
        assert process.returncode == 0
    marks = log.read_text().split()
    assert len(marks) == 6 * 30 * 2 and marks == ["enter", "leave"] * (6 * 30)
