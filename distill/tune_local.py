"""Trials side by side on one machine: the λ search's helper worker processes (``tune.workers``).

On a CPU a batch-1 SwinUNETR-tiny training step does not use a second core well: a demo trial stepped at 0.314 s
at 2 threads and 0.513 s at 1 with another trial beside it (AMD EPYC capped to AVX2). So ``tune.workers: 2`` on 2
cores trains two trials at once, one thread each, instead of one after the other at two: the demo's λ search took
235 s instead of 283 (1.20x; docs/measurements.md).

The helpers are ordinary ``python -m distill.tune --worker`` processes on the study the caller created (the same
command a user starts by hand on other machines; docs/tuning.md), each with ``threads // workers`` torch threads,
their output in ``<run>/tune/workers/worker_<k>.log``. The caller works on the study too, at the same thread
count, and waits for them after its own loop ends. A helper that dies loses nothing: its trial stops
heartbeating, is failed and re-queued, and another worker resumes it from its ``last.pt``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from distill.tune_settings import TuneError

ROOT = Path(__file__).resolve().parents[1]
# A worker started with this variable touches the file it names once it has loaded the study and its inputs.
READY_ENV = "SAM3D_TUNE_READY"


def worker_threads(total: int, workers: int) -> int:
    """Torch threads each of ``workers`` processes gets out of ``total`` (at least 1)."""
    return max(1, int(total) // max(1, int(workers)))


@dataclass
class LocalWorkers:
    """``count`` helper worker processes on one study, started by :meth:`start`, joined by :meth:`join`.

    Args:
        cfg: the run config, written for the helpers as it is (their torch threads are ``--threads``).
        run_dir: run folder (the helpers' ``--run-dir``; logs go to ``tune/workers/``).
        storage: the study's storage URL.
        study_name: the study.
        count: helper processes to start (the caller is one more worker).
        threads: torch threads per helper.
        data_file: the prepared data (``--data``).
        cache_dir: teacher cache (``--cache``), or None.
        tracking_uri: MLflow store of the caller's tracker; None: tracking off in the helpers too.
        experiment: the caller's MLflow experiment (the helpers reopen its tuning run there).
        log: progress lines.
    """

    cfg: Mapping[str, Any]
    run_dir: Path
    storage: str
    study_name: str
    count: int
    threads: int
    data_file: Path
    cache_dir: Path | None = None
    tracking_uri: str | None = None
    experiment: str = ""
    log: Callable[[str], None] = print
    processes: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def command(self, config_file: Path) -> list[str]:
        cmd = [sys.executable, "-m", "distill.tune", "--worker", "--config", str(config_file),
               "--run-dir", str(self.run_dir), "--storage", self.storage, "--study", self.study_name,
               "--data", str(self.data_file), "--threads", str(self.threads)]
        if self.cache_dir is not None:
            cmd += ["--cache", str(self.cache_dir)]
        if self.tracking_uri:
            cmd += ["--tracking-uri", self.tracking_uri, "--experiment", self.experiment]
        else:
            cmd += ["--no-tracking"]
        return cmd

    def start(self, timeout_s: float = 120.0) -> None:
        """Write the helpers' config, start them, and wait (up to ``timeout_s``) until each has loaded the study."""
        folder = Path(self.run_dir) / "tune" / "workers"
        folder.mkdir(parents=True, exist_ok=True)
        # The caller's config as it is: run.threads also sets what a multi-objective study's latency is measured
        # at, which must not depend on the worker; the helper's own torch threads are --threads.
        config_file = folder / "config.yaml"
        tmp = config_file.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(dict(self.cfg), sort_keys=False))
        os.replace(tmp, config_file)
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        flags = []
        for k in range(1, self.count + 1):
            path, flag = folder / f"worker_{k}.log", folder / f"worker_{k}.ready"
            flag.unlink(missing_ok=True)
            with open(path, "ab") as out:
                self.processes.append(subprocess.Popen(self.command(config_file), cwd=ROOT,
                                                       env={**env, READY_ENV: str(flag)}, stdout=out,
                                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                       preexec_fn=_die_with_parent))
            self.logs.append(path)
            flags.append(flag)
        self.log(f"[tune] {self.count} helper worker process(es) at {self.threads} thread(s) each beside this one; "
                 f"their output: {folder}/worker_<k>.log")
        self._wait_ready(flags, timeout_s)

    def _wait_ready(self, flags: list[Path], timeout_s: float) -> None:
        """Wait until every helper has loaded the study (a few seconds of imports), so that the trials are shared
        out as they are asked for and not all taken here while the helpers start. A helper that exits first
        is an error (its log's end is in the message); one that is slow only costs the wait."""
        deadline = time.monotonic() + timeout_s
        while not all(f.exists() for f in flags) and time.monotonic() < deadline:
            for k, (proc, path) in enumerate(zip(self.processes, self.logs), start=1):
                if proc.poll() is not None:
                    self.stop()
                    raise TuneError(f"helper worker {k} exited with {proc.returncode} before it took a trial; "
                                    f"its log: {path}\n{_tail(path)}")
            time.sleep(0.2)

    def join(self, timeout_s: float = 120.0) -> list[str]:
        """Wait for the helpers (the study is finished, so they are ending); returns what went wrong, per helper.

        A helper still alive after ``timeout_s`` is terminated: with the study finished it has nothing left
        to train.
        """
        problems = []
        deadline = time.monotonic() + timeout_s
        for k, (proc, path) in enumerate(zip(self.processes, self.logs), start=1):
            try:
                code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.terminate()
                code = proc.wait()
                problems.append(f"helper worker {k} still running after the study finished; terminated ({path})")
                continue
            if code != 0:
                problems.append(f"helper worker {k} exited with {code}; its log: {path}\n{_tail(path)}")
            else:  # what the helper's trials came to, in the caller's log beside its own trials
                for line in _read(path).splitlines():
                    if line.startswith("[tune] trial ") and ": Dice " in line:
                        self.log(f"{line} (helper worker {k})")
        return problems

    def stop(self) -> None:
        """Terminate every helper (the caller failed or was interrupted); their trials resume on a rerun."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _die_with_parent() -> None:
    """In a helper before it runs (Linux): SIGTERM it when the caller dies, even by SIGKILL, so that no helper
    trains on for a pipeline that is gone (its trial then goes stale and resumes on a rerun)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(_read(path).splitlines()[-lines:])
