"""The SIGINT/SIGTERM flag of the commands must not capture the signals of processes forked under it
(hivemind's DHT process is forked while `swarm-peer bootstrap` has it installed)."""

import multiprocessing as mp
import os
import signal
import time

from peer.training import StopFlag


def _sleep():
    time.sleep(30)


def test_a_child_forked_under_the_flag_gets_the_default_action():
    stop = StopFlag()
    with stop.installed():
        child = mp.get_context("fork").Process(target=_sleep, daemon=True)
        child.start()
        try:
            time.sleep(0.2)
            os.kill(child.pid, signal.SIGTERM)
            child.join(10)
            assert child.exitcode == -signal.SIGTERM  # terminated, not "stopping after this step"
        finally:
            if child.is_alive():
                child.kill()
                child.join(5)
        assert not stop  # and the parent's flag is untouched
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop and stop.signal_name == "SIGTERM"
