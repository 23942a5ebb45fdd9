"""Read perf runs and baselines (pytest-benchmark JSON) and decide whether two may be compared.

A baseline lives at ``perf/baselines/<gpu-slug>/baseline.json`` (with ``thresholds.json`` beside
it). Comparing across GPU models or torch minor versions is refused (:class:`Refused`), never
reported as a regression; an unreadable file is a :class:`BadResultFile` that names the file
and says how to regenerate it.
"""

from __future__ import annotations

import json
import re
import reprlib
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ...checks import is_finite
from ..files import unwritable_file, write_atomically
from .machine import KEY, slugify

BASELINE_FILE = "baseline.json"
THRESHOLDS_FILE = "thresholds.json"
RECORD_HINT = (
    "record one on that GPU with `nox -s perf -- --record` (or `python -m attention.bench.perf record RUN.json`)"
)


class PerfError(Exception):
    """A perf file or comparison problem the user must act on (exit status 2, not a regression)."""


class BadResultFile(PerfError):
    pass


class Refused(PerfError):
    pass


class NoBaseline(PerfError):
    pass


#: A case's ``timing_mode`` where its rounds were CUDA-graph replays (other modes start "eager").
GRAPH = "cuda-graph"


def graph_timed(info: dict) -> bool:
    """Whether a case (its ``extra_info``) was timed in a CUDA graph."""
    return info.get("timing_mode") == GRAPH


@dataclass
class Record:
    """One case of one run."""

    key: str
    median: float  # seconds
    data: list[float] = field(default_factory=list)  # every timed round, seconds
    info: dict = field(default_factory=dict)  # the case's extra_info
    group: str | None = None

    @property
    def peak_mib(self) -> float | None:
        return self.info.get("peak_mem_mib")


@dataclass
class Run:
    path: str
    machine: dict  # our machine_info fields (machine_info["attention_perf"])
    records: dict[str, Record]
    raw: dict  # the whole JSON, for re-writing

    @property
    def gpu(self) -> str:
        return self.machine.get("gpu_name") or f"no GPU ({self.machine.get('device', '?')})"


RUN_HINT = (
    "It is not a complete pytest-benchmark JSON from this suite's perf run; "
    "regenerate it (`nox -s perf`, or re-record the baseline with `nox -s perf -- --record`)."
)
LOG_HINT = "It is not the per-case log a perf run writes (OUT/cases.jsonl)."


def _bad(path: str | Path, what: str) -> BadResultFile:
    return BadResultFile(f"{path}: {what}. {RUN_HINT}")


def read_text(path: str | Path, hint: str) -> str:
    """The UTF-8 text of ``path``; :class:`BadResultFile` naming it when it is missing, a folder,
    unreadable or not UTF-8 (``hint`` says what the file should have been)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadResultFile(f"{path}: no such file") from None
    except IsADirectoryError:
        raise BadResultFile(f"{path}: a folder, not a file") from None
    except UnicodeDecodeError as exc:
        byte = exc.object[exc.start]
        raise BadResultFile(f"{path}: not UTF-8 text (byte {byte:#04x} at offset {exc.start}). {hint}") from None
    except OSError as exc:
        raise BadResultFile(f"{path}: cannot read it ({exc.strerror or exc})") from None


def read_json(path: str | Path, hint: str = RUN_HINT) -> object:
    """The JSON document at ``path``: the one reader of the perf files (runs, baselines, thresholds),
    so every one of them fails the same way, naming the file and what is wrong, then ``hint``."""
    text = read_text(path, hint)
    if not text.strip():
        raise BadResultFile(f"{path}: the file is empty. {hint}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise BadResultFile(f"{path}: invalid JSON at {where} ({exc.msg}; truncated?). {hint}") from None


def write_json(doc: object, path: str | Path) -> Path:
    """``doc`` as JSON at ``path`` (its folder created), whole or not at all; :class:`PerfError`
    naming the path where it cannot be written, never an ``OSError`` traceback."""
    path = Path(path)
    if problem := unwritable_file(path):
        raise PerfError(f"{path}: {problem}")
    try:
        write_atomically(path, json.dumps(doc, indent=1) + "\n")
    except OSError as exc:
        raise PerfError(f"{path}: cannot write it ({exc.strerror or exc})") from None
    return path


#: Numbers a case's ``extra_info`` may carry that verdicts and tables read: each must be a finite
#: number (or absent/null), never a string or NaN that would slip through a comparison.
_INFO_NUMBERS = ("peak_mem_mib", "tflops", "gbps", "copy_fraction", "median_ms", "latency_us", "flops", "min_bytes")
_SLUG = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")


def _positive(value: object) -> bool:
    return is_finite(value) and value > 0


def _check_machine(machine: object, path: str | Path) -> dict:
    if not isinstance(machine, dict) or "torch" not in machine or "device" not in machine:
        raise _bad(path, f"machine_info has no '{KEY}' section (written by the perf plugin)")
    slug = machine.get("slug")
    # The slug names the baseline's folder: it must be one path component, derived from the GPU.
    if not isinstance(slug, str) or not _SLUG.fullmatch(slug):
        raise _bad(path, f"machine_info.{KEY}.slug is {slug!r}, not a GPU slug like 'nvidia-h200'")
    if machine.get("device") == "cuda" and slug != slugify(str(machine.get("gpu_name"))):
        raise _bad(path, f"machine_info.{KEY}.slug {slug!r} does not match gpu_name {machine.get('gpu_name')!r}")
    return machine


def _check_case(key: str, median: object, data: list, info: object, path: str | Path) -> None:
    if not _positive(median):
        raise _bad(path, f"case {key!r}: stats.median is {median!r}, not a positive number of seconds")
    bad = next((x for x in data if not _positive(x)), None)
    if bad is not None:
        raise _bad(path, f"case {key!r}: stats.data holds {bad!r}, not a positive number of seconds")
    if not isinstance(info, dict):
        raise _bad(path, f"case {key!r}: extra_info is a {type(info).__name__}, not an object")
    for field_name in _INFO_NUMBERS:
        value = info.get(field_name)
        ok = is_finite(value) and value >= 0
        if value is not None and not ok:
            raise _bad(path, f"case {key!r}: extra_info.{field_name} is {value!r}, not a finite number >= 0")


def parse_run(raw: object, path: str | Path = "<memory>") -> Run:
    """Validate and index a decoded pytest-benchmark JSON document."""
    if not isinstance(raw, dict):
        raise _bad(path, f"top level is a {type(raw).__name__}, not an object")
    machine_info = raw.get("machine_info")
    if not isinstance(machine_info, dict):
        raise _bad(path, "no 'machine_info' object")
    machine = _check_machine(machine_info.get(KEY), path)
    benches = raw.get("benchmarks")
    if not isinstance(benches, list):
        raise _bad(path, "no 'benchmarks' list")
    records: dict[str, Record] = {}
    for i, bench in enumerate(benches):
        try:
            info = bench.get("extra_info") or {}
            key = info.get("case") or bench["name"]
            stats = bench["stats"]
            median = stats["median"]
            data = list(stats.get("data") or [])
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise _bad(path, f"benchmark #{i} is malformed ({type(exc).__name__}: {exc})") from None
        _check_case(key, median, data, info, path)
        if key in records:
            raise _bad(path, f"case {key!r} appears twice")
        records[key] = Record(key, median, data, info, bench.get("group"))
    return Run(str(path), machine, records, raw)


def load_run(path: str | Path) -> Run:
    """Read a run or baseline file; :class:`BadResultFile` (saying what is wrong) if it is unusable."""
    return parse_run(read_json(path), Path(path))


def load_runs(paths: list[str] | list[Path]) -> list[Run]:
    """Several runs of one grid, each a different run: a file named twice, or a copy of one, would
    count as two runs with no spread between them, and thresholds derived from that spread would
    fall to the floor (a later compare then flags noise)."""
    seen: dict[Path, str] = {}
    for path in map(str, paths):
        real = Path(path).resolve()
        if real in seen:
            raise PerfError(f"the same file is given twice ({seen[real]} and {path}): give each run once")
        seen[real] = path
    runs = [load_run(path) for path in paths]
    check_one_graph_policy(runs)
    timings: dict[tuple, str] = {}
    for run in runs:
        same = timings.setdefault(_timings(run), run.path)
        if same != run.path:
            raise PerfError(f"{run.path} holds the same timings as {same}: a copy of one run is not a second run")
    return runs


def _timings(run: Run) -> tuple:
    """Every timed round of every case: two separate runs never share all of them."""
    return tuple(sorted((key, record.median, tuple(record.data)) for key, record in run.records.items()))


def baseline_dir(root: str | Path, machine: dict) -> Path:
    """``root/<slug>``: one folder under ``root``, never a path out of it (the slug was checked on reading)."""
    slug = machine.get("slug")
    if not isinstance(slug, str) or not _SLUG.fullmatch(slug):
        raise BadResultFile(f"{slug!r} is not a GPU slug like 'nvidia-h200': refusing to use it as a folder name")
    return Path(root) / slug


def require_gpu_run(run: Run) -> None:
    """:class:`NoBaseline` for a run that did not time a CUDA GPU: nothing is compared against it."""
    if run.machine.get("device") != "cuda":
        raise NoBaseline(
            f"{run.path} ran on {run.machine.get('device')}, not a CUDA GPU: CPU numbers are never baselined "
            "or compared (the CPU grid only shows the machinery working)"
        )


def find_baseline(root: str | Path, run: Run) -> Path:
    """The baseline for the GPU ``run`` ran on; :class:`NoBaseline` saying how to record one."""
    require_gpu_run(run)
    path = baseline_dir(root, run.machine) / BASELINE_FILE
    if not path.exists():
        raise NoBaseline(f"no baseline for {run.gpu} at {path}: {RECORD_HINT}, then commit {path.parent}/")
    return path


def check_comparable(baseline: Run, current: Run) -> list[str]:
    """Raise :class:`Refused` if the two runs must not be compared; return warnings otherwise."""
    b, c = baseline.machine, current.machine
    if b.get("device") != c.get("device") or b.get("gpu_name") != c.get("gpu_name"):
        raise Refused(
            f"refusing to compare: the baseline {baseline.path} was recorded on {baseline.gpu}, this run is on "
            f"{current.gpu}. Baselines are per GPU model; {RECORD_HINT}."
        )
    if b.get("torch_minor") != c.get("torch_minor"):
        raise Refused(
            f"refusing to compare: the baseline was recorded with torch {b.get('torch')}, this run uses torch "
            f"{c.get('torch')} (minor versions differ; kernels and backend choices change between them). "
            f"Re-record the baseline with this torch: {RECORD_HINT}."
        )
    warnings = []
    for name in ("torch", "cuda", "cudnn", "triton", "gpu_count", "graphs", "flex_kernel_options"):
        if b.get(name) != c.get(name):
            warnings.append(f"{name} differs: baseline {b.get(name)}, now {c.get(name)}")
    return warnings


def check_one_graph_policy(runs: list[Run]) -> None:
    """Refuse (:class:`Refused`) runs timed under different ``--perf-graphs`` policies: a case's
    middle run, or its spread, would mix eager and graph-replayed timings."""
    policies = {run.path: run.machine.get("graphs") for run in runs}
    if len(set(policies.values())) > 1:
        listed = ", ".join(f"{path}: {policy}" for path, policy in policies.items())
        raise Refused(f"refusing to combine runs timed under different --perf-graphs policies ({listed})")


def merge_runs(runs: list[Run]) -> Run:
    """One run made of the middle run of each case (by median): a steadier baseline than any one run."""
    if not runs:
        raise ValueError("no runs to merge")
    check_one_graph_policy(runs)
    for other in runs[1:]:
        check_comparable(runs[0], other)
    keys = list(dict.fromkeys(k for run in runs for k in run.records))
    chosen, benches = {}, []
    by_key = {id(r): {b.get("extra_info", {}).get("case") or b["name"]: b for b in r.raw["benchmarks"]} for r in runs}
    for key in keys:
        present = [r for r in runs if key in r.records]
        present.sort(key=lambda r: r.records[key].median)
        middle = present[(len(present) - 1) // 2]
        chosen[key] = middle.records[key]
        benches.append(by_key[id(middle)][key])
    raw = dict(runs[-1].raw, benchmarks=benches)
    raw["machine_info"] = dict(runs[-1].raw["machine_info"])
    raw["machine_info"][KEY] = dict(runs[-1].machine, merged_from=len(runs))
    return Run(f"merge of {len(runs)} runs", raw["machine_info"][KEY], chosen, raw)


def write_run(run: Run, path: str | Path) -> Path:
    return write_json(run.raw, path)


def log_entries(jsonl: str | Path, run: str | None = None) -> Iterator[tuple[int, dict]]:
    """``(line number, entry)`` of the per-case log (lines of ``run`` only, if given); lines cut
    off by a process that died mid-write are skipped."""
    for number, line in enumerate(read_text(jsonl, LOG_HINT).splitlines(), 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and (run is None or entry.get("run") == run):
            yield number, entry


def not_timed(jsonl: Path, run: str | None = None, impl: str | None = None) -> list[tuple[str, str]]:
    """The cases the per-case log lists as skipped, failed or refused (in ``run``, of ``impl``, if
    given), with why; none where there is no log."""
    if not jsonl.is_file():
        return []
    return [
        (entry["case"], f"{entry['status']}: {entry.get('reason', '')}")
        for _, entry in log_entries(jsonl, run)
        if entry.get("case") and entry.get("status") not in (None, "passed") and impl in (None, entry.get("impl"))
    ]


def salvage(jsonl: str | Path, run: str | None = None) -> dict:
    """A pytest-benchmark-shaped document rebuilt from the per-case log (lines of ``run`` only, if
    given), for a run whose process died before pytest-benchmark wrote its JSON. Lines that are
    cut off are skipped."""
    machine_info: dict = {}
    benches = []
    for number, entry in log_entries(jsonl, run):
        if entry.get("machine_info"):
            machine_info = entry["machine_info"]
        elif entry.get("status") == "passed" and entry.get("data"):
            benches.append(_salvaged_case(entry, f"{jsonl}, line {number}"))
    return {"machine_info": machine_info, "benchmarks": benches, "salvaged_from": str(jsonl)}


def _salvaged_case(entry: dict, where: str) -> dict:
    """One finished case of the log as pytest-benchmark writes it; a whole line that is not one
    (no case name, timings that are not numbers) is :class:`BadResultFile`, not skipped."""
    case, data = entry.get("case"), entry["data"]
    if not isinstance(case, str) or not case:
        raise BadResultFile(f"{where}: a passed case whose name is {case!r}, not a case key. {LOG_HINT}")
    if not isinstance(data, list) or not all(is_finite(x) for x in data):
        raise BadResultFile(f"{where}: case {case!r}: data is {reprlib.repr(data)}, not a list of seconds. {LOG_HINT}")
    return {
        "name": case,
        "group": entry.get("group"),
        "extra_info": entry.get("extra_info", {}),
        "stats": {"median": statistics.median(data), "data": data, "rounds": len(data)},
    }
