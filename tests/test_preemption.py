"""Stop signals (dynadiag.preemption): recorded while active, previous handlers restored, Slurm requeue only where it
belongs. The end-to-end stop/resume runs are in tests/test_resume.py."""

from __future__ import annotations

import os
import signal
import stat

import pytest

from dynadiag.preemption import StopSignals, requeue_slurm_job


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_is_recorded_and_handlers_restored(sig):
    before = signal.getsignal(sig)
    with StopSignals() as signals:
        assert not signals.requested() and signals.received is None
        os.kill(os.getpid(), sig)  # would end the process without the handler
        assert signals.requested() and signals.name == sig.name
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal does not overwrite the first
        assert signals.received == sig
    assert signal.getsignal(sig) is before


def _fake_scontrol(tmp_path, monkeypatch):
    """A stand-in ``scontrol`` on PATH (no Slurm here) that records its arguments."""
    log = tmp_path / "calls.txt"
    script = tmp_path / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    return log


def test_requeue_only_in_a_plain_slurm_job(tmp_path, monkeypatch):
    log = _fake_scontrol(tmp_path, monkeypatch)
    for key in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_"))]:
        monkeypatch.delenv(key)
    assert not requeue_slurm_job() and not log.exists()  # not under Slurm
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert requeue_slurm_job() and log.read_text() == "requeue 4242\n"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert requeue_slurm_job() and log.read_text().splitlines()[-1] == "requeue 4200_7"
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")  # submitit requeues on its own signal: leave it alone
    assert not requeue_slurm_job() and len(log.read_text().splitlines()) == 2
