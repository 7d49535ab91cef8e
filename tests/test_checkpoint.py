"""Checkpoint files: atomic and durable, safe when the replicas of a stage share a directory and save at once, loaded
without running anything in them, falling back past a damaged one; key files kept private."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading

import pytest
import torch

from peer import checkpoint as ckpt
from peer.errors import CheckpointError


def test_writers_saving_the_same_step_in_one_directory_all_succeed(tmp_path):
    """Two stage replicas leaving together save the same epoch into the shared ``--checkpoint-dir``: one
    temporary name for both made the second rename fail (the peer then crashed on its way out)."""
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def saver(i: int) -> None:
        try:
            start.wait(timeout=30)
            for step in range(10):
                ckpt.save_checkpoint(tmp_path, step, {"model": {"w": torch.full((64, 64), float(i))}}, keep=3)
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=saver, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert [step for step, _ in ckpt.checkpoint_steps(tmp_path)] == [7, 8, 9]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000007.pt", "step-00000008.pt", "step-00000009.pt"]
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))["step"] == 9


class _Planted:
    """Pickles as a call to ``Path.touch(marker)``: what a planted checkpoint would run on a full unpickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def test_a_checkpoint_holding_a_pickled_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    planted = tmp_path / "ckpt" / "step-00000005.pt"
    planted.parent.mkdir()
    torch.save({"model": {}, "step": 5, "payload": _Planted(marker)}, planted)
    with pytest.raises(CheckpointError, match="holds objects other than tensors") as refused:
        ckpt.load_checkpoint(planted)
    assert not marker.exists()
    # what was refused, not torch's advice on how to load it anyway, nor its terminal escapes
    assert "GLOBAL" in str(refused.value) and "weights_only" not in str(refused.value) and "\x1b" not in \
        str(refused.value)
    with pytest.raises(CheckpointError, match="no checkpoint .* reads"):
        ckpt.load_latest(planted.parent)
    assert not marker.exists()


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, {"model": {"w": torch.full((256,), float(step))}}, keep=3)
    newest = tmp_path / "step-00000003.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated: a crash mid-write on another filesystem
    path, state = ckpt.load_latest(tmp_path)
    assert path.name == "step-00000002.pt" and state["step"] == 2 and float(state["model"]["w"][0]) == 2.0
    assert "skipping" in caplog.text and "step-00000003.pt" in caplog.text
    assert ckpt.load_latest(tmp_path / "none") is None


def test_the_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    ckpt.save_checkpoint(tmp_path, 1, {"rng": ckpt.rng_state()}, keep=1)
    expected = (torch.rand(3), random.random(), np.random.rand(3))
    torch.rand(5), random.random(), np.random.rand(7)  # move every generator on
    ckpt.set_rng_state(ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))["rng"])
    got = (torch.rand(3), random.random(), np.random.rand(3))
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and np.array_equal(got[2], expected[2])


def test_a_save_that_cannot_be_written_leaves_nothing_partial(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="cannot save checkpoint"):
        ckpt.save_checkpoint(blocker / "ckpt", 1, {"w": torch.zeros(4)}, keep=2)
    with pytest.raises(Exception, match="pickle"):  # a state that cannot be pickled: the error stays, the file goes
        ckpt.save_checkpoint(tmp_path, 2, {"w": lambda: 0}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-directory"]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounts a small tmpfs (root)")
def test_a_full_disk_keeps_the_older_checkpoints_and_no_temporary_file(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        ckpt.save_checkpoint(disk, 1, {"w": torch.zeros(1024)}, keep=3)  # 4 KiB
        with pytest.raises(CheckpointError, match="No space left"):
            ckpt.save_checkpoint(disk, 2, {"w": torch.zeros(1 << 20)}, keep=3)  # 4 MiB
        assert sorted(p.name for p in disk.iterdir()) == ["step-00000001.pt"]
        assert ckpt.load_latest(disk)[1]["step"] == 1
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_key_files_are_kept_private(tmp_path):
    from dht.owner import load_or_create_identity
    from dht.signing import load_or_create_key

    key_file = tmp_path / "me.rsa"
    load_or_create_key(key_file)
    assert key_file.stat().st_mode & 0o777 == 0o600
    key_file.chmod(0o644)  # copied around carelessly
    load_or_create_key(key_file)
    assert key_file.stat().st_mode & 0o777 == 0o600
    identity = tmp_path / "me.id"
    load_or_create_identity(identity)
    identity.chmod(0o444)
    load_or_create_identity(identity)
    assert identity.stat().st_mode & 0o077 == 0


def test_a_checkpoint_from_before_rng_states_were_tensors_still_loads(tmp_path):
    import random

    import numpy as np

    old = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    path = tmp_path / "step-00000001.pt"
    torch.save({"rng": old, "step": 1}, path)  # as this project wrote them until now
    expected = np.random.rand(3)
    np.random.rand(5)
    ckpt.set_rng_state(ckpt.load_checkpoint(path)["rng"])
    assert np.array_equal(np.random.rand(3), expected)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounts a read-only tmpfs (root)")
def test_a_key_file_on_a_read_only_mount_is_used_as_it_is(tmp_path, caplog):
    """A container's identity is often a read-only 0644 mount: the key is used, with a warning, not refused."""
    from dht.owner import load_identity, load_or_create_identity

    disk = tmp_path / "secrets"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        identity = disk / "bootstrap.id"
        expected = load_or_create_identity(identity).get_public_key().to_bytes()
        identity.chmod(0o644)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        assert load_identity(identity).get_public_key().to_bytes() == expected
        assert "cannot be made private" in caplog.text
    finally:
        subprocess.run(["umount", str(disk)], check=True)
