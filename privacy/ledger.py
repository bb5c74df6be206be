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

File format: JSON Lines. The first line is ``{"type": "init", ...}`` with the default budget; then ``"budget"``
lines (an admin changed one dataset's budget) and ``"spend"`` lines (a job's cumulative ε after a round).
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

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
    ) -> None:
        super().__init__(message)
        self.dataset_id = dataset_id
        self.budget_epsilon = budget_epsilon
        self.spent_epsilon = spent_epsilon
        self.asked_epsilon = asked_epsilon


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
class DatasetStatus:
    """One row of the ledger summary."""

    dataset_id: str
    budget: Budget
    spent: Spend

    @property
    def remaining_epsilon(self) -> float:
        return max(self.budget.epsilon - self.spent.epsilon, 0.0)


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
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except FileExistsError:
            raise LedgerError(f"a ledger already exists at {path}; it is never overwritten (use set-budget)") from None
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(_dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(path.parent)
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

    def datasets(self) -> list[str]:
        seen: dict[str, None] = {}
        for rec in self._records[1:]:
            if "dataset_id" in rec:
                seen.setdefault(rec["dataset_id"], None)
        return list(seen)

    def status(self) -> list[DatasetStatus]:
        return [DatasetStatus(d, self.budget(d), self.spent(d)) for d in self.datasets()]

    # -- the checks ----------------------------------------------------------------------------------------------
    def check_budget(
        self, *, dataset_id: str, planned_epsilon: float, delta: float, job_id: str | None = None
    ) -> DatasetStatus:
        """Raise :class:`PrivacyBudgetExceeded` unless ``planned_epsilon`` (and ``delta``) fit in what is left.

        ``job_id``: a job being resumed; its own earlier records are part of its plan, so they are counted as
        ``max(planned, already spent by this job)`` instead of twice.
        """
        _check_id("dataset_id", dataset_id)
        if not _finite(planned_epsilon) or planned_epsilon <= 0:
            raise ValueError(f"planned_epsilon must be a finite number > 0, got {planned_epsilon!r}")
        if not _finite(delta) or not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        self.reload()
        budget = self.budget(dataset_id)
        others = self.spent(dataset_id, exclude_job=job_id)
        own = self.spent(dataset_id).jobs.get(job_id, (0.0, 0.0, -1)) if job_id is not None else (0.0, 0.0, -1)
        total_eps = others.epsilon + max(float(planned_epsilon), own[0])
        total_delta = others.delta + max(float(delta), own[1])
        spent_eps = others.epsilon + own[0]
        if total_eps > budget.epsilon * (1 + _REL_TOL) or total_delta > budget.delta * (1 + _REL_TOL):
            raise PrivacyBudgetExceeded(
                f"privacy budget exceeded for dataset {dataset_id!r} (ledger {self.path}): "
                f"budget ε={budget.epsilon:.4g} (δ={budget.delta:.3g}), already spent ε={spent_eps:.4g} "
                f"(δ={others.delta + own[1]:.3g}) by {len(others.jobs) + (own[2] >= 0)} job(s), "
                f"this job asks ε={float(planned_epsilon):.4g} (δ={float(delta):.3g}); "
                f"nothing was trained. Lower the job's ε or ask the site admin to change the budget.",
                dataset_id=dataset_id,
                budget_epsilon=budget.epsilon,
                spent_epsilon=spent_eps,
                asked_epsilon=float(planned_epsilon),
            )
        log.info(
            "privacy budget ok for %s: budget ε=%.4g, spent %.4g, job plans %.4g",
            dataset_id,
            budget.epsilon,
            spent_eps,
            planned_epsilon,
        )
        return DatasetStatus(dataset_id, budget, self.spent(dataset_id))

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

        The spend is written first: it happened. If the dataset is now over budget, the error is raised after the
        write, so the caller stops (and sends nothing more).
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
        status = DatasetStatus(dataset_id, self.budget(dataset_id), self.spent(dataset_id))
        log.info(
            "ledger %s: job %s round %d dataset %s cumulative ε=%.4g; dataset spent ε=%.4g of %.4g",
            self.path,
            job_id,
            round,
            dataset_id,
            epsilon,
            status.spent.epsilon,
            status.budget.epsilon,
        )
        budget = status.budget
        if status.spent.epsilon > budget.epsilon * (1 + _REL_TOL) or status.spent.delta > budget.delta * (1 + _REL_TOL):
            raise PrivacyBudgetExceeded(
                f"dataset {dataset_id!r} is now over its privacy budget: budget ε={budget.epsilon:.4g}, spent "
                f"ε={status.spent.epsilon:.4g} (recorded in {self.path}); stop the job and send nothing more",
                dataset_id=dataset_id,
                budget_epsilon=budget.epsilon,
                spent_epsilon=status.spent.epsilon,
                asked_epsilon=float(epsilon),
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
        """A Markdown table of budget, spent and remaining per dataset, then each job's spend."""
        default = self.default_budget()
        lines = [
            f"Privacy ledger {self.path} (site {self.site or '?'}; default budget ε={default.epsilon:g}, "
            f"δ={default.delta:g} per dataset; jobs add up: basic composition)",
            "",
            "| dataset | budget ε | spent ε | remaining ε | budget δ | spent δ | jobs |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        rows = self.status()
        for st in rows:
            lines.append(
                f"| {st.dataset_id} | {st.budget.epsilon:.4g} | {st.spent.epsilon:.4g} | {st.remaining_epsilon:.4g} "
                f"| {st.budget.delta:.3g} | {st.spent.delta:.3g} | {len(st.spent.jobs)} |"
            )
        if not rows:
            lines.append("| (no dataset has spent anything yet) | | | | | | |")
        jobs = [(st.dataset_id, job, v) for st in rows for job, v in st.spent.jobs.items()]
        if jobs:
            lines += ["", "| dataset | job | ε (cumulative) | δ | last round |", "|---|---|---:|---:|---:|"]
            lines += [f"| {d} | {j} | {v[0]:.4g} | {v[1]:.3g} | {v[2]} |" for d, j, v in jobs]
        return "\n".join(lines)

    # -- internals -----------------------------------------------------------------------------------------------
    def _load(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            raise LedgerNotFoundError(
                f"no privacy ledger at {self.path}. It is never created implicitly (that would reset the spent ε "
                f"to zero): a site admin creates it once with `fetal-fl privacy ledger init {self.path} "
                f"--epsilon <budget> --delta <budget>`"
            )
        with _locked(self.path, "r", fcntl.LOCK_SH) as fh:
            text = fh.read()
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

    def _append(self, rec: dict[str, Any]) -> None:
        problem = _record_problem(rec, first=False)
        if problem:  # never write what _load would refuse
            raise ValueError(problem)
        line = _dumps(rec) + "\n"
        if not self.path.exists():
            raise LedgerNotFoundError(f"privacy ledger {self.path} disappeared; nothing recorded")
        with _locked(self.path, "a", fcntl.LOCK_EX) as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        self._records = self._load()


_SPEND_KEYS = {"type", "job_id", "dataset_id", "epsilon", "delta", "round", "time"}


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


@contextlib.contextmanager
def _locked(path: Path, mode: str, lock: int) -> Iterator[Any]:
    with open(path, mode, encoding="utf-8") as fh:
        fcntl.flock(fh.fileno(), lock)
        try:
            yield fh
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
