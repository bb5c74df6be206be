"""A site's persistent privacy ledger: the ε each dataset has spent, across every federated job.

Why: a DP guarantee is only meaningful over *everything* released about a dataset. Each job's engine composes ε
within the job; across jobs this ledger adds them up (basic composition: ε and δ of separate jobs add, a
conservative bound) and refuses a job whose planned ε would take a dataset past the budget the site admin set.

Safety rules, all fail-closed:

* The ledger is created only by an explicit :meth:`SiteLedger.init` with a budget. A missing file is an error,
  never "nothing spent yet"; a file that does not parse or has an unknown record is an error naming the line, never
  silently reset or skipped.
* Spending is recorded as it happens (one appended, fsync'ed JSON line per round), so a crashed job still counts.
* A job's records carry its *cumulative* ε; the job counts with its largest recorded ε (and δ).
* Concurrent jobs at one site cannot together overspend: a job *reserves* its planned ε before training
  (:meth:`SiteLedger.reserve`: check and append under one exclusive file lock, fsync'ed; the lock is
  :func:`fetalseg.plumbing.file_lock` on the hidden sibling ``.<ledger name>.lock``), spends against the
  reservation as it goes, and releases the unspent remainder at a clean end (:meth:`SiteLedger.release`). Every
  check counts spent + reserved. A reservation of a crashed job keeps counting until an admin releases it
  (``fetal-fl privacy ledger release``); what the job spent still counts after any release.

File format: JSON Lines. The first line is ``{"type": "init", ...}`` with the default budget; then ``"budget"``
lines (an admin changed one dataset's budget), ``"spend"`` lines (a job's cumulative ε after a round),
``"reserve"`` lines (a job's planned ε, held for it) and ``"release"`` lines (a reservation ended: the job ended
cleanly, or an admin released a crashed job's). While a job's reservation is active the job counts with
max(reserved, spent); after its release, with what it spent.
"""

from __future__ import annotations

import getpass
import json
import logging
import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fetalseg.plumbing import JSONL_PERMISSIONS, append_jsonl, file_lock, fsync_dir, lock_file_for

log = logging.getLogger(__name__)

LEDGER_VERSION = 1
_REL_TOL = 1e-9  # float jitter allowed when comparing a spend to its budget


class LedgerError(RuntimeError):
    """The ledger cannot be trusted or used; nothing may be trained or sent until an admin fixes it."""


class LedgerNotFoundError(LedgerError, FileNotFoundError):
    """No ledger at the given path (it is never created implicitly)."""


class LedgerCorruptError(LedgerError):
    """The ledger file exists but a line does not parse or is not a valid record."""


class PrivacyBudgetExceeded(RuntimeError):  # noqa: N818 - the name the NVFlare jobs use
    """A job (or a step) would take a dataset past its privacy budget."""

    def __init__(
        self,
        message: str,
        *,
        dataset_id: str | None = None,
        budget_epsilon: float | None = None,
        spent_epsilon: float | None = None,
        asked_epsilon: float | None = None,
        reserved_epsilon: float | None = None,
    ) -> None:
        super().__init__(message)
        self.dataset_id = dataset_id
        self.budget_epsilon = budget_epsilon
        self.spent_epsilon = spent_epsilon
        self.asked_epsilon = asked_epsilon
        self.reserved_epsilon = reserved_epsilon  # held by other jobs' reservations, not yet spent


@dataclass(frozen=True)
class Budget:
    """Total (ε, δ) a dataset may spend over all jobs."""

    epsilon: float
    delta: float


@dataclass
class Spend:
    """What a dataset has spent: summed over jobs, each job counted at its largest recorded ε."""

    epsilon: float = 0.0
    delta: float = 0.0
    jobs: dict[str, tuple[float, float, int]] = field(default_factory=dict)  # job_id -> (ε, δ, last round)


@dataclass(frozen=True)
class Reservation:
    """A job's active reservation on a dataset: its planned (ε, δ), held until the job releases it."""

    job_id: str
    dataset_id: str
    epsilon: float
    delta: float
    time: str = ""
    host: str = ""
    pid: int | None = None
    by: str = ""


@dataclass(frozen=True)
class DatasetStatus:
    """One row of the ledger summary.

    ``reserved_epsilon`` / ``reserved_delta``: held by active reservations and not yet spent (a job with an active
    reservation counts with max(reserved, spent)); ``committed_*`` = spent + reserved, what every check counts.
    """

    dataset_id: str
    budget: Budget
    spent: Spend
    reserved_epsilon: float = 0.0
    reserved_delta: float = 0.0

    @property
    def committed_epsilon(self) -> float:
        return self.spent.epsilon + self.reserved_epsilon

    @property
    def committed_delta(self) -> float:
        return self.spent.delta + self.reserved_delta

    @property
    def remaining_epsilon(self) -> float:
        return max(self.budget.epsilon - self.committed_epsilon, 0.0)

    @property
    def over_budget(self) -> bool:
        return self.committed_epsilon > self.budget.epsilon * (1 + _REL_TOL) or self.committed_delta > (
            self.budget.delta * (1 + _REL_TOL)
        )


class SiteLedger:
    """Read and append a site's ledger file. Construction reads and validates the whole file (fails if missing)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._records = self._load()

    # -- creation ------------------------------------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        path: str | os.PathLike[str],
        *,
        epsilon_budget: float,
        delta_budget: float,
        site: str = "",
    ) -> SiteLedger:
        """Create a new ledger with a default per-dataset budget; refuses to overwrite an existing one."""
        _check_budget_values(epsilon_budget, delta_budget)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "type": "init",
            "version": LEDGER_VERSION,
            "site": str(site),
            "epsilon_budget": float(epsilon_budget),
            "delta_budget": float(delta_budget),
            "time": _now(),
            "by": _user(),
        }
        with file_lock(lock_file_for(path)):  # no reader sees the file before its first line is written
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, JSONL_PERMISSIONS)
            except FileExistsError:
                raise LedgerError(
                    f"a ledger already exists at {path}; it is never overwritten (use set-budget)"
                ) from None
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(_dumps(record) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        fsync_dir(path.parent)
        log.info(
            "privacy ledger created at %s: default budget ε=%g δ=%g per dataset", path, epsilon_budget, delta_budget
        )
        return cls(path)

    # -- reading -------------------------------------------------------------------------------------------------
    def reload(self) -> None:
        """Re-read the file (another job at this site may have appended)."""
        self._records = self._load()

    @property
    def records(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._records]

    @property
    def site(self) -> str:
        return str(self._records[0].get("site", ""))

    def default_budget(self) -> Budget:
        head = self._records[0]
        return Budget(float(head["epsilon_budget"]), float(head["delta_budget"]))

    def budget(self, dataset_id: str) -> Budget:
        """The budget of ``dataset_id``: its latest ``set_budget``, else the ledger's default."""
        current = self.default_budget()
        for rec in self._records[1:]:
            if rec["type"] == "budget" and rec["dataset_id"] == dataset_id:
                current = Budget(float(rec["epsilon_budget"]), float(rec["delta_budget"]))
        return current

    def spent(self, dataset_id: str, *, exclude_job: str | None = None) -> Spend:
        """ε and δ spent on ``dataset_id`` (basic composition over jobs; a job counts at its largest record)."""
        out = Spend()
        for rec in self._records[1:]:
            if rec["type"] != "spend" or rec["dataset_id"] != dataset_id or rec["job_id"] == exclude_job:
                continue
            eps, delta, rnd = out.jobs.get(rec["job_id"], (0.0, 0.0, -1))
            out.jobs[rec["job_id"]] = (max(eps, rec["epsilon"]), max(delta, rec["delta"]), max(rnd, rec["round"]))
        out.epsilon = math.fsum(v[0] for v in out.jobs.values())
        out.delta = math.fsum(v[1] for v in out.jobs.values())
        return out

    def reservations(self, dataset_id: str | None = None) -> list[Reservation]:
        """Active reservations (reserved and not yet released), of one dataset or of all, in ledger order."""
        active: dict[tuple[str, str], Reservation] = {}
        for rec in self._records[1:]:
            key = (rec.get("job_id", ""), rec.get("dataset_id", ""))
            if rec["type"] == "reserve":
                active.pop(key, None)  # a new reservation of the same job replaces its old one
                active[key] = Reservation(
                    job_id=rec["job_id"],
                    dataset_id=rec["dataset_id"],
                    epsilon=float(rec["epsilon"]),
                    delta=float(rec["delta"]),
                    time=str(rec.get("time", "")),
                    host=str(rec.get("host", "")),
                    pid=rec.get("pid") if isinstance(rec.get("pid"), int) else None,
                    by=str(rec.get("by", "")),
                )
            elif rec["type"] == "release":
                active.pop(key, None)
        return [r for r in active.values() if dataset_id is None or r.dataset_id == dataset_id]

    def reservation(self, *, dataset_id: str, job_id: str) -> Reservation | None:
        """The job's active reservation on the dataset, or None."""
        return next((r for r in self.reservations(dataset_id) if r.job_id == job_id), None)

    def datasets(self) -> list[str]:
        seen: dict[str, None] = {}
        for rec in self._records[1:]:
            if "dataset_id" in rec:
                seen.setdefault(rec["dataset_id"], None)
        return list(seen)

    def dataset_status(self, dataset_id: str, *, exclude_job: str | None = None) -> DatasetStatus:
        """Budget, spent and reserved-unspent of ``dataset_id`` (optionally leaving one job out of both)."""
        spent = self.spent(dataset_id, exclude_job=exclude_job)
        eps_parts, delta_parts = [], []
        for res in self.reservations(dataset_id):
            if res.job_id == exclude_job:
                continue
            job_eps, job_delta, _ = spent.jobs.get(res.job_id, (0.0, 0.0, -1))
            eps_parts.append(max(res.epsilon - job_eps, 0.0))
            delta_parts.append(max(res.delta - job_delta, 0.0))
        return DatasetStatus(dataset_id, self.budget(dataset_id), spent, math.fsum(eps_parts), math.fsum(delta_parts))

    def status(self) -> list[DatasetStatus]:
        return [self.dataset_status(d) for d in self.datasets()]

    # -- the checks ----------------------------------------------------------------------------------------------
    def check_budget(
        self, *, dataset_id: str, planned_epsilon: float, delta: float, job_id: str | None = None
    ) -> DatasetStatus:
        """Raise :class:`PrivacyBudgetExceeded` unless ``planned_epsilon`` (and ``delta``) fit in what is left.

        What is left = budget − spent − reserved by other jobs. This only checks; two jobs that check at the same
        time can both pass — a job that will train calls :meth:`reserve` instead, which checks and holds the ε
        atomically. ``job_id``: a job being resumed; its own earlier records are part of its plan, so they are
        counted as ``max(planned, already spent by this job)`` instead of twice (its own reservation is replaced
        by the plan).
        """
        _check_plan(dataset_id, planned_epsilon, delta)
        self.reload()
        return self._fit(dataset_id=dataset_id, planned_epsilon=planned_epsilon, delta=delta, job_id=job_id)

    def _fit(self, *, dataset_id: str, planned_epsilon: float, delta: float, job_id: str | None) -> DatasetStatus:
        others = self.dataset_status(dataset_id, exclude_job=job_id)
        budget = others.budget
        own = self.spent(dataset_id).jobs.get(job_id, (0.0, 0.0, -1)) if job_id is not None else (0.0, 0.0, -1)
        total_eps = others.committed_epsilon + max(float(planned_epsilon), own[0])
        total_delta = others.committed_delta + max(float(delta), own[1])
        spent_eps = others.spent.epsilon + own[0]
        n_reserving = sum(1 for r in self.reservations(dataset_id) if r.job_id != job_id)
        if total_eps > budget.epsilon * (1 + _REL_TOL) or total_delta > budget.delta * (1 + _REL_TOL):
            raise PrivacyBudgetExceeded(
                f"privacy budget exceeded for dataset {dataset_id!r} (ledger {self.path}): "
                f"budget ε={budget.epsilon:.4g} (δ={budget.delta:.3g}), already spent ε={spent_eps:.4g} "
                f"(δ={others.spent.delta + own[1]:.3g}) by {len(others.spent.jobs) + (own[2] >= 0)} job(s), "
                f"reserved and not yet spent by {n_reserving} other running (or crashed, unreleased) job(s) "
                f"ε={others.reserved_epsilon:.4g} (δ={others.reserved_delta:.3g}), "
                f"this job asks ε={float(planned_epsilon):.4g} (δ={float(delta):.3g}); "
                f"nothing was trained. Lower the job's ε or ask the site admin to change the budget.",
                dataset_id=dataset_id,
                budget_epsilon=budget.epsilon,
                spent_epsilon=spent_eps,
                asked_epsilon=float(planned_epsilon),
                reserved_epsilon=others.reserved_epsilon,
            )
        log.info(
            "privacy budget ok for %s: budget ε=%.4g, spent %.4g, reserved by others %.4g, job plans %.4g",
            dataset_id,
            budget.epsilon,
            spent_eps,
            others.reserved_epsilon,
            planned_epsilon,
        )
        return self.dataset_status(dataset_id)

    # -- reservations ----------------------------------------------------------------------------------------------
    def reserve(self, *, job_id: str, dataset_id: str, epsilon: float, delta: float, **details: Any) -> DatasetStatus:
        """Hold ``epsilon`` (the job's planned ε) for ``job_id`` on ``dataset_id``, or raise PrivacyBudgetExceeded.

        Atomic across processes: the ledger is read, checked (spent + reserved + this plan ≤ budget) and the
        ``reserve`` record appended and fsync'ed under one exclusive lock of the ledger file, so two jobs that
        reserve at the same time cannot both pass when together they exceed the budget. The reservation is durable:
        if the job crashes it keeps counting until an admin runs ``fetal-fl privacy ledger release``.

        Reserving again with the same job id (a restarted client) replaces its reservation; an identical one is
        not written twice. Returns the dataset's status after the reservation.
        """
        _check_id("job_id", job_id)
        _check_plan(dataset_id, epsilon, delta)

        def decide() -> dict[str, Any] | None:
            self._fit(dataset_id=dataset_id, planned_epsilon=epsilon, delta=delta, job_id=job_id)
            current = self.reservation(dataset_id=dataset_id, job_id=job_id)
            if current is not None and current.epsilon == float(epsilon) and current.delta == float(delta):
                return None
            return {
                "type": "reserve",
                "job_id": job_id,
                "dataset_id": dataset_id,
                "epsilon": float(epsilon),
                "delta": float(delta),
                "time": _now(),
                "by": _user(),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                **{k: v for k, v in details.items() if k not in _RESERVE_KEYS},
            }

        written = self._transact(decide)
        status = self.dataset_status(dataset_id)
        log.info(
            "ledger %s: job %s %s ε=%.4g (δ=%g) on %s; dataset spent %.4g + reserved %.4g of %.4g",
            self.path,
            job_id,
            "reserved" if written else "already holds",
            epsilon,
            delta,
            dataset_id,
            status.spent.epsilon,
            status.reserved_epsilon,
            status.budget.epsilon,
        )
        return status

    def release(
        self, *, job_id: str, dataset_id: str, admin: bool = False, note: str = "", missing_ok: bool = False
    ) -> float:
        """End ``job_id``'s reservation on ``dataset_id``; return the unspent ε it gave back (what it spent stays).

        A job calls this at a clean end (``admin=False``). For a crashed job a site admin calls it
        (``admin=True``, from ``fetal-fl privacy ledger release``) once sure the job is not running: a job that
        keeps training after its release still records its spend, and that spend still counts. Without an active
        reservation: :class:`LedgerError`, or 0.0 with ``missing_ok``.
        """
        _check_id("job_id", job_id)
        _check_id("dataset_id", dataset_id)
        released: list[float] = []

        def decide() -> dict[str, Any] | None:
            res = self.reservation(dataset_id=dataset_id, job_id=job_id)
            if res is None:
                if missing_ok:
                    return None
                raise LedgerError(
                    f"privacy ledger {self.path}: job {job_id!r} holds no reservation on dataset {dataset_id!r} "
                    f"(active: {[(r.job_id, r.dataset_id) for r in self.reservations()]})"
                )
            spent = self.spent(dataset_id).jobs.get(job_id, (0.0, 0.0, -1))[0]
            released.append(max(res.epsilon - spent, 0.0))
            return {
                "type": "release",
                "job_id": job_id,
                "dataset_id": dataset_id,
                "reason": "admin" if admin else "job end",
                "released_epsilon": released[-1],
                "note": str(note),
                "time": _now(),
                "by": _user(),
                "host": socket.gethostname(),
                "pid": os.getpid(),
            }

        self._transact(decide)
        if released:
            log.info(
                "ledger %s: %s released job %s's reservation on %s (unspent ε=%.4g given back)",
                self.path,
                "admin" if admin else "the job",
                job_id,
                dataset_id,
                released[0],
            )
        return released[0] if released else 0.0

    # -- appending -----------------------------------------------------------------------------------------------
    def record(
        self,
        *,
        job_id: str,
        dataset_id: str,
        epsilon: float,
        delta: float,
        round: int,
        **details: Any,
    ) -> DatasetStatus:
        """Append the job's cumulative (ε, δ) after ``round`` (fsync'ed before returning).

        The spend is written first: it happened. A job with a reservation spends against it. If the dataset's
        spent + reserved is now over budget (this job spent more than it reserved, or took what others reserved),
        the error is raised after the write, so the caller stops (and sends nothing more).
        """
        _check_id("job_id", job_id)
        _check_id("dataset_id", dataset_id)
        if not _finite(epsilon) or epsilon < 0:
            raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
        if not _finite(delta) or not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise ValueError(f"round must be an integer >= 0, got {round!r}")
        rec = {
            "type": "spend",
            "job_id": job_id,
            "dataset_id": dataset_id,
            "epsilon": float(epsilon),
            "delta": float(delta),
            "round": int(round),
            "time": _now(),
            **{k: v for k, v in details.items() if k not in _SPEND_KEYS},
        }
        self._append(rec)
        status = self.dataset_status(dataset_id)
        log.info(
            "ledger %s: job %s round %d dataset %s cumulative ε=%.4g; dataset spent ε=%.4g (+%.4g reserved) of %.4g",
            self.path,
            job_id,
            round,
            dataset_id,
            epsilon,
            status.spent.epsilon,
            status.reserved_epsilon,
            status.budget.epsilon,
        )
        budget = status.budget
        if status.over_budget:
            raise PrivacyBudgetExceeded(
                f"dataset {dataset_id!r} is now over its privacy budget: budget ε={budget.epsilon:.4g}, spent "
                f"ε={status.spent.epsilon:.4g}, reserved by running jobs and not yet spent "
                f"ε={status.reserved_epsilon:.4g} (recorded in {self.path}); stop the job and send nothing more",
                dataset_id=dataset_id,
                budget_epsilon=budget.epsilon,
                spent_epsilon=status.spent.epsilon,
                asked_epsilon=float(epsilon),
                reserved_epsilon=status.reserved_epsilon,
            )
        return status

    def set_budget(self, *, dataset_id: str, epsilon_budget: float, delta_budget: float, note: str = "") -> None:
        """Change one dataset's budget (an admin decision, appended with time and user, never rewriting history)."""
        _check_id("dataset_id", dataset_id)
        _check_budget_values(epsilon_budget, delta_budget)
        self._append(
            {
                "type": "budget",
                "dataset_id": dataset_id,
                "epsilon_budget": float(epsilon_budget),
                "delta_budget": float(delta_budget),
                "note": str(note),
                "time": _now(),
                "by": _user(),
            }
        )

    # -- display -------------------------------------------------------------------------------------------------
    def format_table(self) -> str:
        """Markdown tables: budget, spent, reserved and remaining per dataset; active reservations; each job's spend."""
        default = self.default_budget()
        lines = [
            f"Privacy ledger {self.path} (site {self.site or '?'}; default budget ε={default.epsilon:g}, "
            f"δ={default.delta:g} per dataset; jobs add up: basic composition)",
            "",
            "| dataset | budget ε | spent ε | reserved ε (not yet spent) | remaining ε | budget δ | spent δ | jobs |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        rows = self.status()
        for st in rows:
            lines.append(
                f"| {st.dataset_id} | {st.budget.epsilon:.4g} | {st.spent.epsilon:.4g} | {st.reserved_epsilon:.4g} "
                f"| {st.remaining_epsilon:.4g} | {st.budget.delta:.3g} | {st.spent.delta:.3g} | {len(st.spent.jobs)} |"
            )
        if not rows:
            lines.append("| (no dataset has spent anything yet) | | | | | | | |")
        reservations = self.reservations()
        if reservations:
            lines += [
                "",
                "Active reservations (a job's planned ε, held until it ends cleanly; a crashed job's reservation "
                "counts until an admin runs `fetal-fl privacy ledger release <ledger> --dataset <id> --job <id>`):",
                "",
                "| dataset | job | reserved ε | δ | spent so far ε | not yet spent ε | since | host | pid |",
                "|---|---|---:|---:|---:|---:|---|---|---:|",
            ]
            for r in reservations:
                spent = self.spent(r.dataset_id).jobs.get(r.job_id, (0.0, 0.0, -1))[0]
                lines.append(
                    f"| {r.dataset_id} | {r.job_id} | {r.epsilon:.4g} | {r.delta:.3g} | {spent:.4g} "
                    f"| {max(r.epsilon - spent, 0.0):.4g} | {r.time} | {r.host or '?'} "
                    f"| {r.pid if r.pid is not None else '?'} |"
                )
        jobs = [(st.dataset_id, job, v) for st in rows for job, v in st.spent.jobs.items()]
        if jobs:
            lines += ["", "| dataset | job | ε (cumulative) | δ | last round |", "|---|---|---:|---:|---:|"]
            lines += [f"| {d} | {j} | {v[0]:.4g} | {v[1]:.3g} | {v[2]} |" for d, j, v in jobs]
        return "\n".join(lines)

    # -- internals -----------------------------------------------------------------------------------------------
    def _not_found(self) -> LedgerNotFoundError:
        return LedgerNotFoundError(
            f"no privacy ledger at {self.path}. It is never created implicitly (that would reset the spent ε "
            f"to zero): a site admin creates it once with `fetal-fl privacy ledger init {self.path} "
            f"--epsilon <budget> --delta <budget>`"
        )

    def _load(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            raise self._not_found()
        try:
            with file_lock(lock_file_for(self.path)):
                text = self._read_text()
        except PermissionError:
            # A reader without write access to the ledger's folder cannot take the lock; it reads unlocked. An append
            # caught halfway then shows as an incomplete last line, which _parse refuses (fail closed), never a sum.
            log.debug("privacy ledger %s: no write access for its lock file; reading without the lock", self.path)
            text = self._read_text()
        return self._parse(text)

    def _read_text(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise self._not_found() from None

    def _parse(self, text: str) -> list[dict[str, Any]]:
        if not text:
            raise LedgerCorruptError(f"privacy ledger {self.path} is empty; restore it from backup (never reset)")
        lines = text.split("\n")
        if lines[-1] != "":
            raise LedgerCorruptError(
                f"privacy ledger {self.path}: line {len(lines)} is incomplete (a crash while writing?). Inspect it; "
                f"the ledger is not used until an admin fixes it"
            )
        records = []
        for no, line in enumerate(lines[:-1], start=1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LedgerCorruptError(f"privacy ledger {self.path}: line {no} is not JSON ({exc.msg})") from None
            problem = _record_problem(rec, first=no == 1)
            if problem:
                raise LedgerCorruptError(f"privacy ledger {self.path}: line {no}: {problem}")
            records.append(rec)
        return records

    def _transact(self, decide: Callable[[], dict[str, Any] | None]) -> bool:
        """Read, decide and append under ONE exclusive lock of the ledger file; return whether a record was written.

        ``decide`` runs with ``self._records`` freshly read under the lock; it returns the record to append, None
        to write nothing, or raises (nothing written). The append (one ``O_APPEND`` write,
        :func:`fetalseg.plumbing.append_jsonl`) is fsync'ed before the lock is let go. The file is never created here
        (nor the lock file, when the ledger is missing).
        """
        if not self.path.is_file():
            raise self._not_found()
        with file_lock(lock_file_for(self.path)):
            self._records = self._parse(self._read_text())
            rec = decide()
            if rec is None:
                return False
            problem = _record_problem(rec, first=False)
            if problem:  # never write what _load would refuse
                raise ValueError(problem)
            try:
                line = append_jsonl(self.path, rec, lock=False, create=False, allow_nan=False)
            except FileNotFoundError:
                raise self._not_found() from None
            self._records.append(json.loads(line))
            return True

    def _append(self, rec: dict[str, Any]) -> None:
        problem = _record_problem(rec, first=False)
        if problem:  # never write what _load would refuse
            raise ValueError(problem)
        self._transact(lambda: rec)


_SPEND_KEYS = {"type", "job_id", "dataset_id", "epsilon", "delta", "round", "time"}
_RESERVE_KEYS = {"type", "job_id", "dataset_id", "epsilon", "delta", "time", "by", "host", "pid"}


def _record_problem(rec: Any, *, first: bool) -> str | None:
    """Why ``rec`` is not a valid ledger record (None if it is)."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    kind = rec.get("type")
    if first:
        if kind != "init":
            return "the first record must be the 'init' record"
        if rec.get("version") != LEDGER_VERSION:
            return f"unsupported ledger version {rec.get('version')!r} (this code reads {LEDGER_VERSION})"
        return _budget_problem(rec)
    if kind == "spend":
        for key in ("job_id", "dataset_id"):
            if not isinstance(rec.get(key), str) or not rec[key]:
                return f"'{key}' must be a non-empty string"
        if not _finite(rec.get("epsilon")) or rec["epsilon"] < 0:
            return f"bad epsilon {rec.get('epsilon')!r}"
        if not _finite(rec.get("delta")) or not 0 < rec["delta"] < 1:
            return f"bad delta {rec.get('delta')!r}"
        if isinstance(rec.get("round"), bool) or not isinstance(rec.get("round"), int) or rec["round"] < 0:
            return f"bad round {rec.get('round')!r}"
        return None
    if kind == "budget":
        if not isinstance(rec.get("dataset_id"), str) or not rec["dataset_id"]:
            return "'dataset_id' must be a non-empty string"
        return _budget_problem(rec)
    if kind in ("reserve", "release"):
        for key in ("job_id", "dataset_id"):
            if not isinstance(rec.get(key), str) or not rec[key]:
                return f"'{key}' must be a non-empty string"
        if kind == "release":
            return None
        if not _finite(rec.get("epsilon")) or rec["epsilon"] <= 0:
            return f"bad reserved epsilon {rec.get('epsilon')!r}"
        if not _finite(rec.get("delta")) or not 0 < rec["delta"] < 1:
            return f"bad reserved delta {rec.get('delta')!r}"
        return None
    return f"unknown record type {kind!r}"


def _budget_problem(rec: dict[str, Any]) -> str | None:
    eps, delta = rec.get("epsilon_budget"), rec.get("delta_budget")
    if not _finite(eps) or eps <= 0:
        return f"bad epsilon_budget {eps!r}"
    if not _finite(delta) or not 0 < delta < 1:
        return f"bad delta_budget {delta!r}"
    return None


def _check_budget_values(epsilon_budget: float, delta_budget: float) -> None:
    if not _finite(epsilon_budget) or epsilon_budget <= 0:
        raise ValueError(f"epsilon budget must be a finite number > 0, got {epsilon_budget!r}")
    if not _finite(delta_budget) or not 0 < delta_budget < 1:
        raise ValueError(f"delta budget must be in (0, 1), got {delta_budget!r}")


def _check_plan(dataset_id: Any, planned_epsilon: Any, delta: Any) -> None:
    _check_id("dataset_id", dataset_id)
    if not _finite(planned_epsilon) or planned_epsilon <= 0:
        raise ValueError(f"planned_epsilon must be a finite number > 0, got {planned_epsilon!r}")
    if not _finite(delta) or not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _check_id(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _dumps(rec: dict[str, Any]) -> str:
    return json.dumps(rec, sort_keys=True, allow_nan=False, default=str)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "?"
