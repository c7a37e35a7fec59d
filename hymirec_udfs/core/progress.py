"""Progress lines for long stages, readable in a cron or Airflow log, and live training metrics.

Two background threads on the driver, both started and stopped by the stage runner or
the caller, both rate-limited to ``tracking.progress_every_s`` (0 turns them off):

* :class:`SparkProgress` polls Spark's status tracker while a stage runs and logs the
  running Spark stage's finished/total tasks, elapsed time and an ETA; a stage that
  declares what it processes (``ctx.progress.expect(n, "items")``) also gets units/s
  (embed: items/s, evaluate: users/s), estimated from the task fraction done.
* :class:`MetricsFollower` tails the JSON-lines metrics file training rank 0 appends to
  (:func:`hymirec_udfs.training.checkpoints.append_metrics`), sends each new record to
  MLflow as it arrives (the run's charts fill during training, and a crashed run keeps
  what it logged) and logs one line per interval (step, epoch, loss, samples/s). It reads
  the file, not the ranks: no MLflow credentials are needed on executors, only the shared
  checkpoint directory the driver already reads.

Lines go to the ``hymirec_udfs.progress`` logger (INFO; the CLI's ``--log-level``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

logger = logging.getLogger("hymirec_udfs.progress")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


class _Poller:
    """A daemon thread calling ``self.poll()`` every ``every_s`` until :meth:`stop`."""

    def __init__(self, every_s: float) -> None:
        self.every_s = float(every_s)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def poll(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - progress must never fail the stage
                logger.debug("progress poll failed: %s", exc)

    def start(self) -> "_Poller":
        if self.every_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=type(self).__name__, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.every_s))

    def __enter__(self) -> "_Poller":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class SparkProgress(_Poller):
    """Progress of the Spark work a stage runs (see the module docstring)."""

    def __init__(self, spark: Any, stage: str, every_s: float) -> None:
        try:
            tracker = spark.sparkContext.statusTracker()
        except Exception:  # noqa: BLE001 - a Spark Connect session has no status tracker
            tracker, every_s = None, 0
        super().__init__(every_s)
        self.stage = stage
        self._tracker = tracker
        self._t0 = time.monotonic()
        self.total: Optional[int] = None
        self.unit = ""
        self.lines: list[str] = []  # what was logged (tests, and the last line on failure)

    def expect(self, total: int, unit: str) -> None:
        """Declare that this stage's big Spark stage processes ``total`` ``unit``."""
        self.total, self.unit = int(total), unit

    def poll(self) -> None:
        infos = [self._tracker.getStageInfo(i) for i in self._tracker.getActiveStageIds()]
        infos = [i for i in infos if i is not None and i.numTasks > 0]
        elapsed = time.monotonic() - self._t0
        if not infos:
            line = f"{self.stage}: running for {_duration(elapsed)} (driver-side work, no Spark tasks active)"
        else:
            info = max(infos, key=lambda i: i.numTasks)  # the stage doing the bulk of the work
            frac = info.numCompletedTasks / info.numTasks
            call = info.name.split(" at ")[0]
            call = "" if call.startswith("$") else f" '{call}'"  # Spark's name for a lambda says nothing
            line = (f"{self.stage}: Spark stage {info.stageId}{call} "
                    f"{info.numCompletedTasks}/{info.numTasks} tasks ({info.numActiveTasks} running), "
                    f"{_duration(elapsed)} elapsed")
            if frac > 0:
                line += f", ETA {_duration(elapsed * (1 - frac) / frac)}"
                if self.total:
                    line += f", ~{self.total * frac / max(elapsed, 1e-9):,.0f} {self.unit}/s of {self.total:,}"
        self.lines.append(line)
        logger.info(line)


class MetricsFollower(_Poller):
    """Tails a training metrics file into MLflow and the log (see the module docstring).

    Args:
        path: the JSON-lines file rank 0 appends to.
        every_s: poll interval.
        send: called with each new record's metrics and step (``RunLogger.metrics`` with
            the caller's prefix), as records arrive.
        label: the name in progress lines.
    """

    def __init__(self, path: str, every_s: float, send: Callable[[dict[str, float], int], None],
                 label: str = "train") -> None:
        super().__init__(every_s)
        self.path = Path(path)
        self.send = send
        self.label = label
        self._offset = 0
        self._lock = threading.Lock()
        self.sent = 0
        self.lines: list[str] = []

    def poll(self) -> None:
        with self._lock:
            if not self.path.exists():
                return
            size = self.path.stat().st_size
            if size < self._offset:  # truncated by a resume: records after its step follow
                self._offset = 0
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]  # never half a line being written
            self._offset += len(complete)
            last_train: Optional[dict[str, Any]] = None
            for raw in complete.splitlines():
                if not raw.strip():
                    continue
                record = json.loads(raw)
                step = int(record.get("step", 0))
                values = {k: float(v) for k, v in record.items() if k not in ("step", "kind")
                          and isinstance(v, (int, float)) and not isinstance(v, bool)}
                self.send(values, step)
                self.sent += 1
                if record.get("kind") == "train":
                    last_train = record
                elif record.get("kind"):
                    line = f"{self.label}: {record['kind']} at step {step}: " + ", ".join(
                        f"{k} {v:.4g}" for k, v in values.items() if k != "epoch")
                    self.lines.append(line)
                    logger.info(line)
            if last_train is not None:
                line = (f"{self.label}: step {last_train['step']}, epoch {last_train.get('epoch', 0)}, "
                        f"loss {last_train.get('loss', float('nan')):.4f}")
                if "samples_per_s" in last_train:
                    line += f", {last_train['samples_per_s']:,.1f} samples/s"
                self.lines.append(line)
                logger.info(line)

    def stop(self) -> None:
        """Stop polling and send whatever the file holds that was not sent yet."""
        super().stop()
        try:
            self.poll()
        except Exception as exc:  # noqa: BLE001
            logger.warning("could not read the last training metrics from %s: %s", self.path, exc)
