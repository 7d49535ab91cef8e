"""Checkpoint files: atomic, and safe when the replicas of a stage share a directory and save at once."""

from __future__ import annotations

import threading

import torch

from peer import checkpoint as ckpt


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
