"""``pcpp bench``: the benchmark grid, each point in fresh worker processes.

A point is (latent size, world size, policy, transport, link). For every point the runner

1. waits for a quiet machine (:mod:`.machine`) and records its load;
2. runs one worker with the same seed -- the stock UNet, a fresh process -- (``--baseline
   per-point``, the default; ``shared`` runs it once per latent size and link);
3. runs N fresh workers of :mod:`.worker` (``zmq``/``torch`` through the local launcher, ``mpi``
   through ``mpiexec``; with a throttled link, one rank per network namespace), each bound to its
   share of the CPUs unless ``--cpu-bind none`` (the one worker of step 2 is never bound);
4. records the time of the denoising loop on the slowest rank and the speed-up against step 2,
   PSNR of the final latent against step 2's, bytes received per rank per step after warm-up by
   layer kind (the engine's ledger, checked against the transport's own counter and the
   formulas), stale-context buffer bytes, peak RSS per worker, and the CPU others used meanwhile.

World size 1 is a point of its own: the stock UNet and the wrapped one alternated in one process.
Results go to ``OUT/results.json``, ``results.csv``, ``results.md`` and PNG plots
(:mod:`.report`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..accounting import KINDS
from ..files import write_json
from ..launch.local import CPU_BIND_MODES
from . import machine
from .worker import PROGRESS_PREFIX

__all__ = ["BenchOptions", "Point", "PolicySpec", "run_bench"]

_PROGRESS_RE = re.compile(re.escape(PROGRESS_PREFIX) + r" (\d+) (\d+)")


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    name: str
    portion: float = 0.3

    @classmethod
    def parse(cls, text: str) -> "PolicySpec":
        """``sync``, ``full``, ``none``, ``partial`` (p = 0.3) or ``partial:0.1``."""
        name, _, portion = text.strip().partition(":")
        if not name:
            raise ValueError(f"empty policy in {text!r}")
        try:
            value = float(portion) if portion else 0.3
        except ValueError:
            raise ValueError(f"portion of {text!r} is not a number (write e.g. partial:0.3)") from None
        return cls(name, value)

    @property
    def label(self) -> str:
        return f"{self.name}({self.portion:g})" if self.name == "partial" else self.name


@dataclasses.dataclass(frozen=True)
class Point:
    model: str
    latent: int
    world: int
    policy: PolicySpec
    transport: str
    link: str  # "loopback" (one host) or a tc rate over the veth pair ("veth": unthrottled)
    steps: int
    warmup: int
    seed: int

    @property
    def key(self) -> str:
        policy = self.policy.label.replace("(", "").replace(")", "")
        return f"{self.model}-l{self.latent}-n{self.world}-{policy}-{self.transport}-{self.link}"

    def spec(self, timeout: float) -> dict[str, Any]:
        return {
            "model": self.model,
            "latent": self.latent,
            "world": self.world,
            "policy": self.policy.name,
            "portion": self.policy.portion,
            "transport": self.transport,
            "steps": self.steps,
            "warmup": self.warmup,
            "seed": self.seed,
            "timeout": timeout,
        }


@dataclasses.dataclass
class BenchOptions:
    """What ``pcpp bench`` runs (see ``pcpp bench --help``)."""

    out: str = "bench-out"
    model: str = "bench"
    policies: Sequence[PolicySpec] = (PolicySpec("sync"), PolicySpec("full"), PolicySpec("partial", 0.3), PolicySpec("none"))
    worlds: Sequence[int] = (1, 2, 4)
    sizes: Sequence[int] | None = None  # default: the model's
    transports: Sequence[str] = ("zmq",)
    steps: int | None = None
    warmup: int | None = None
    seed: int = 0
    baseline: str = "per-point"  # or "shared"
    throttle: Sequence[str] = ()  # tc rates, "veth" = the pair without a limit
    throttle_transports: Sequence[str] | None = None
    throttle_policies: Sequence[PolicySpec] | None = None
    throttle_sizes: Sequence[int] | None = None
    overhead_sizes: Sequence[int] | None = None  # default: the smallest size
    overhead_repeats: int = 3
    wait: bool = True
    max_busy: float = 0.3
    max_load: float | None = None
    quiet_wait: float = 1200.0
    foreign_limit: float = 0.15
    retries: int = 1
    repeats: int = 1  # one worker / N workers runs per point, alternating (medians reported)
    point_timeout: float = 900.0
    #: ``cores``: each of a point's N workers bound to its share of the CPUs (the local launcher's
    #: ``--cpu-bind cores``, mpiexec's ``-bind-to core``); ``none``: the kernel places them
    cpu_bind: str = "cores"
    progress: bool = True
    plots: bool = True
    skip_grid: bool = False  # only the throttled-link points
    targets: str | None = None  # a targets file (.targets); None: no targets checked
    command: str = ""


# ---------------------------------------------------------------------- processes
def _python() -> str:
    return sys.executable


def mpiexec_path() -> str | None:
    candidate = Path(sys.executable).parent / "mpiexec"
    return str(candidate) if candidate.exists() else shutil.which("mpiexec")


def _worker_argv(role: str, spec: dict[str, Any], out: Path) -> list[str]:
    return [_python(), "-m", "pcpp_runtime.bench.worker", "--role", role, "--spec", json.dumps(spec), "--out", str(out)]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("DIFFUSERS_VERBOSITY", "error")
    return env


class PointFailed(RuntimeError):
    pass


def _run(argv: list[str], log: Path, timeout: float, on_progress: Callable[[int, int], None] | None) -> None:
    """Run ``argv`` (its own process group), copy its output to ``log``, report progress lines;
    raise :class:`PointFailed` with the log's tail on a non-zero exit or a timeout."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as sink:
        sink.write(f"$ {' '.join(argv)}\n")
        sink.flush()
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(), text=True,
            start_new_session=True, stdin=subprocess.DEVNULL,
        )
        expired = threading.Event()

        def kill() -> None:
            expired.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

        timer = threading.Timer(timeout, kill)
        timer.daemon = True
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                match = _PROGRESS_RE.search(line)
                if match:
                    if on_progress is not None:
                        on_progress(int(match.group(1)), int(match.group(2)))
                    continue
                sink.write(line)
            code = proc.wait()
        except BaseException:
            kill()
            proc.wait()
            raise
        finally:
            timer.cancel()
    if expired.is_set():
        raise PointFailed(f"timed out after {timeout:.0f} s; log: {log}\n{_tail(log)}")
    if code != 0:
        raise PointFailed(f"exit code {code}; log: {log}\n{_tail(log)}")


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------------- one point
class _Bar:
    """One progress bar per point (tqdm when available and wanted)."""

    def __init__(self, desc: str, total: int, enabled: bool) -> None:
        self._bar = None
        self._offset = 0
        if enabled:
            try:
                from tqdm.auto import tqdm

                # redrawn twice a second on a terminal; in a log file, a line every 30 s is plenty
                interval = 0.5 if sys.stderr.isatty() else 30.0
                self._bar = tqdm(total=total, desc=desc, unit="step", leave=True, mininterval=interval, file=sys.stderr)
            except ImportError:
                pass

    def phase(self, offset: int) -> Callable[[int, int], None]:
        self._offset = offset

        def update(done: int, _total: int) -> None:
            if self._bar is not None:
                self._bar.n = self._offset + done
                self._bar.refresh()

        return update

    def close(self, postfix: str = "") -> None:
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.close()


def _load_latent(path: Path):
    import torch

    return torch.load(path, weights_only=True)


class Runner:
    def __init__(self, options: BenchOptions, say: Callable[[str], None] = print) -> None:
        self.options = options
        self.out = Path(options.out)
        self.say = say
        self._baselines: dict[tuple, dict[str, Any]] = {}
        self._formula_cache: dict[tuple, Any] = {}

    # -------------------------------------------------------------- quiet
    def quiet(self) -> dict[str, Any]:
        o = self.options
        if not o.wait:
            return machine.Quiet(machine.loadavg(), float("nan"), 0.0, True).to_dict()
        state = machine.wait_for_quiet(max_busy=o.max_busy, max_load=o.max_load, max_wait_s=o.quiet_wait, say=self.say)
        if not state.quiet:
            self.say(f"  the machine did not become quiet within {o.quiet_wait:.0f} s; measuring anyway (flagged)")
        return state.to_dict()

    # -------------------------------------------------------------- baseline
    def baseline(self, point: Point, bar: _Bar, folder: Path, offset: int = 0) -> dict[str, Any]:
        key = (point.model, point.latent, point.steps, point.seed)
        if self.options.baseline == "shared" and key in self._baselines:
            return self._baselines[key]
        out = folder / "baseline"
        spec = point.spec(self.options.point_timeout)
        meter = machine.CpuMeter()
        _run(_worker_argv("baseline", spec, out), folder / "log.txt", self.options.point_timeout, bar.phase(offset))
        result = json.loads((out / "result.json").read_text())
        result["machine_during"] = meter.stop()
        result["latent_path"] = str(out / "latent.pt")
        self._baselines[key] = result
        return result

    # -------------------------------------------------------------- parallel
    def launch_argv(self, point: Point, spec: dict[str, Any], out: Path, pair=None) -> list[str]:
        worker = _worker_argv("parallel", spec, out)
        if point.transport == "mpi":
            if pair is not None:
                raise ValueError("the throttled-link mode runs zmq or torch (one rank per namespace), not mpi")
            mpiexec = mpiexec_path()
            if mpiexec is None:
                raise PointFailed("mpiexec not found (pip install mpich, or put an MPI's mpiexec on PATH)")
            bind = ["-bind-to", "core"] if self.options.cpu_bind == "cores" else []
            return [mpiexec, *bind, "-n", str(point.world), *worker]
        argv = [_python(), "-m", "pcpp_runtime.bench.launcher", "--nproc", str(point.world),
                "--timeout", str(self.options.point_timeout), "--cpu-bind", self.options.cpu_bind]
        if pair is not None:
            argv += ["--netns", ",".join(pair.names), "--addrs", ",".join(pair.addrs)]
        return argv + ["--", *worker]

    def run_point(self, point: Point, pair=None) -> dict[str, Any]:
        o = self.options
        folder = self.out / "runs" / point.key
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        attempts = []
        for attempt in range(o.retries + 1):
            quiet = self.quiet()
            bar = _Bar(self._desc(point), 2 * point.steps, o.progress)
            try:
                if point.world == 1:
                    record = self._overhead_point(point, folder, bar)
                else:
                    record = self._parallel_point(point, folder, bar, pair)
            finally:
                bar.close()
            record["machine_before"] = quiet
            record["attempt"] = attempt + 1
            record["contended"] = self._contended(record, quiet)
            attempts.append(record)
            if not record["contended"] or attempt == o.retries:
                break
            self.say(f"  {point.key}: others used {self._foreign(record):.2f} cores during the run; running it again")
            self._baselines.pop((point.model, point.latent, point.steps, point.seed), None)
        best = attempts[-1]
        if len(attempts) > 1:
            best["earlier_attempts"] = [{k: a.get(k) for k in ("seconds", "baseline_seconds", "speedup", "machine_during")} for a in attempts[:-1]]
        self.say(self._summary(best))
        return best

    def _desc(self, point: Point) -> str:
        link = "" if point.link == "loopback" else f" @{point.link}"
        if point.world == 1:
            return f"{point.latent}² n=1 stock/wrapped"
        return f"{point.latent}² n={point.world} {point.policy.label} {point.transport}{link}"

    def _foreign(self, record: dict[str, Any]) -> float:
        parts = [record.get("machine_during", {}), record.get("baseline_machine_during", {})]
        return max((p.get("foreign_cpu_cores", 0.0) for p in parts if p), default=0.0)

    def _contended(self, record: dict[str, Any], quiet: dict[str, Any]) -> bool:
        return (not quiet.get("quiet", True)) or self._foreign(record) > self.options.foreign_limit

    def _overhead_point(self, point: Point, folder: Path, bar: _Bar) -> dict[str, Any]:
        import statistics

        spec = dict(point.spec(self.options.point_timeout), repeats=self.options.overhead_repeats)
        total = 2 * self.options.overhead_repeats * point.steps
        if bar._bar is not None:
            bar._bar.total = total
        meter = machine.CpuMeter()
        out = folder / "overhead"
        _run(_worker_argv("overhead", spec, out), folder / "log.txt", self.options.point_timeout, bar.phase(0))
        during = meter.stop()
        result = json.loads((out / "result.json").read_text())
        stock = statistics.median(result["stock_seconds"])
        wrapped = statistics.median(result["wrapped_seconds"])
        return {
            "key": point.key,
            "kind": "world1",
            **self._point_fields(point),
            "seconds": wrapped,
            "baseline_seconds": stock,
            "speedup": stock / wrapped,
            "overhead_pct": 100.0 * (wrapped / stock - 1.0),
            "stock_seconds_runs": result["stock_seconds"],
            "wrapped_seconds_runs": result["wrapped_seconds"],
            "identical": result["identical"],
            "psnr_db": None,
            "peak_rss_bytes": [result["peak_rss_bytes"]],
            "stale_buffer_bytes": [0],
            "received_per_step": [0.0],
            "received_per_step_mean": 0.0,
            "received_by_kind_mean": {k: 0.0 for k in KINDS},
            "machine_during": during,
        }

    def _parallel_point(self, point: Point, folder: Path, bar: _Bar, pair) -> dict[str, Any]:
        import statistics

        repeats = max(1, self.options.repeats)
        if bar._bar is not None:
            bar._bar.total = 2 * point.steps * repeats
        spec = point.spec(self.options.point_timeout)
        out = folder / "parallel"
        argv = self.launch_argv(point, spec, out, pair)
        runs = []
        for rep in range(repeats):  # one worker, then N workers, alternating
            base = self.baseline(point, bar, folder, offset=2 * point.steps * rep)
            meter = machine.CpuMeter()
            _run(argv, folder / "log.txt", self.options.point_timeout, bar.phase(point.steps * (2 * rep + 1)))
            during = meter.stop()
            result = json.loads((out / "result.json").read_text())
            runs.append({
                "seconds": max(r["seconds"] for r in result["ranks"]),
                "baseline_seconds": base["seconds"],
                "machine_during": during,
                "baseline_machine_during": base.get("machine_during"),
            })
        during = max((r["machine_during"] for r in runs), key=lambda m: m["foreign_cpu_cores"])
        base_during = max((r["baseline_machine_during"] or {"foreign_cpu_cores": 0.0} for r in runs),
                          key=lambda m: m["foreign_cpu_cores"])
        ranks = result["ranks"]
        latents = _load_latent(out / "latent.pt")
        reference = _load_latent(Path(base["latent_path"]))
        from pcpp_runtime.metrics import compare_latents

        comparison = compare_latents(latents, reference)
        seconds = statistics.median(r["seconds"] for r in runs)
        baseline_seconds = statistics.median(r["baseline_seconds"] for r in runs)
        received = [r["received_per_step"]["total"] for r in ranks]
        by_kind = [{k: r["received_per_step"].get(k, 0.0) for k in KINDS} for r in ranks]
        world = len(ranks)
        step_seconds = [max(r["step_seconds"][i] for r in ranks) for i in range(point.steps)]
        formula = self._formula(point)
        record = {
            "key": point.key,
            "kind": "parallel",
            **self._point_fields(point),
            "seconds": seconds,
            "seconds_per_rank": [r["seconds"] for r in ranks],
            "baseline_seconds": baseline_seconds,
            "speedup": baseline_seconds / seconds,
            "runs": runs,
            "psnr_db": comparison.psnr_db,
            "max_abs_diff": comparison.max_abs_diff,
            "identical": comparison.identical,
            "received_per_step": received,
            "received_per_step_mean": sum(received) / world,
            "received_per_step_max": max(received),
            "received_by_kind": by_kind,
            "received_by_kind_mean": {k: sum(b[k] for b in by_kind) / world for k in KINDS},
            "received_per_step_warmup": [r["received_per_step_warmup"]["total"] for r in ranks],
            "sent_per_step": [r["sent_per_step"]["total"] for r in ranks],
            "engine_bytes_received": [r["engine_bytes_received"] for r in ranks],
            "transport_bytes_received": [r["transport_bytes_received"] for r in ranks],
            "bytes_agree": all(r["engine_bytes_received"] == r["transport_bytes_received"] for r in ranks),
            "formula_received_per_step": formula,
            "formula_agrees": formula is None or all(abs(f - m) < 0.5 for f, m in zip(formula, received)),
            "stale_buffer_bytes": [sum(r["stale_buffer_bytes"].values()) for r in ranks],
            "stale_buffer_bytes_by_kind": [r["stale_buffer_bytes"] for r in ranks],
            "peak_rss_bytes": [r["peak_rss_bytes"] for r in ranks],
            "baseline_peak_rss_bytes": base["peak_rss_bytes"],
            "step_seconds": step_seconds,
            "baseline_step_seconds": base["step_seconds"],
            "cpu_seconds": [r["cpu_seconds"] for r in ranks],
            "torch_threads": [r["torch_threads"] for r in ranks],
            "machine_during": during,
            "baseline_machine_during": base_during,
        }
        return record

    def _point_fields(self, point: Point) -> dict[str, Any]:
        return {
            "model": point.model,
            "latent": point.latent,
            "world_size": point.world,
            "policy": point.policy.name if point.world > 1 else "wrapped",
            "portion": point.policy.portion,
            "label": point.policy.label if point.world > 1 else "stock vs wrapped",
            "transport": point.transport if point.world > 1 else "-",
            "link": point.link,
            "steps": point.steps,
            "warmup_steps": point.warmup,
            "seed": point.seed,
        }

    def _formula(self, point: Point) -> list[float] | None:
        """Bytes each rank should receive per displaced step (pcpp_runtime.formulas)."""
        try:
            from .costmodel import formula_bytes

            table = formula_bytes(point.model, point.latent, point.world, point.policy.name, point.policy.portion,
                                  steps=point.steps, warmup=point.warmup, batch=1, element_size=4,
                                  cache=self._formula_cache)
        except Exception as exc:  # noqa: BLE001 - a cross-check; never fails the benchmark
            self.say(f"  (formula check skipped: {type(exc).__name__}: {exc})")
            return None
        return [float(r["displaced"]["total"]) for r in table]

    def _summary(self, r: dict[str, Any]) -> str:
        flag = "  [CONTENDED: others used the CPU]" if r.get("contended") else ""
        if r["kind"] == "world1":
            return (f"  {r['latent']}² world 1: stock {r['baseline_seconds']:.2f} s, wrapped {r['seconds']:.2f} s "
                    f"({r['overhead_pct']:+.2f}%), identical={r['identical']}{flag}")
        psnr = "identical" if r["psnr_db"] is None else f"{r['psnr_db']:.1f} dB"
        runs = f" (medians of {len(r['runs'])} runs)" if len(r.get("runs") or []) > 1 else ""
        return (f"  {r['latent']}² n={r['world_size']} {r['label']} {r['transport']} {r['link']}: "
                f"{r['seconds']:.2f} s vs {r['baseline_seconds']:.2f} s one worker = {r['speedup']:.2f}x{runs}, "
                f"{r['received_per_step_mean'] / 1e6:.2f} MB/step, PSNR {psnr}, bytes agree={r['bytes_agree']}{flag}")


# ---------------------------------------------------------------------- the grid
def grid(options: BenchOptions) -> list[Point]:
    from .model import MODELS

    spec = MODELS[options.model]
    steps = options.steps or spec.steps
    warmup = spec.warmup_steps if options.warmup is None else options.warmup
    sizes = list(options.sizes or spec.latent_sizes)
    overhead_sizes = list(options.overhead_sizes) if options.overhead_sizes is not None else sizes[:1]
    points = []
    for size in sizes:
        for world in options.worlds:
            if world == 1:
                if size in overhead_sizes:
                    points.append(Point(options.model, size, 1, PolicySpec("none"), "-", "loopback", steps, warmup, options.seed))
                continue
            for transport in options.transports:
                for policy in options.policies:
                    points.append(Point(options.model, size, world, policy, transport, "loopback", steps, warmup, options.seed))
    return points


def throttled_grid(options: BenchOptions) -> list[Point]:
    from .model import MODELS

    spec = MODELS[options.model]
    steps = options.steps or spec.steps
    warmup = spec.warmup_steps if options.warmup is None else options.warmup
    sizes = list(options.throttle_sizes or options.sizes or spec.latent_sizes)
    transports = list(options.throttle_transports or [t for t in options.transports if t != "mpi"] or ["zmq"])
    policies = list(options.throttle_policies or options.policies)
    points = []
    for rate in options.throttle:
        for size in sizes:
            for transport in transports:
                for policy in policies:
                    points.append(Point(options.model, size, 2, policy, transport, rate, steps, warmup, options.seed))
    return points


def _machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import diffusers
        import torch

        info["torch"] = torch.__version__
        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parents[2])
        if head.returncode == 0:
            info["git_head"] = head.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def run_bench(options: BenchOptions, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the grid (and the throttled-link points), write the output folder, return the results."""
    from .model import MODELS
    from .report import write_outputs
    from .targets import load_targets

    if options.model not in MODELS or options.model == "sdxl":
        raise ValueError(f"pcpp bench runs the models bench and tiny, not {options.model!r}")
    if options.baseline not in ("per-point", "shared"):
        raise ValueError(f"--baseline is per-point or shared, got {options.baseline!r}")
    if options.cpu_bind not in CPU_BIND_MODES:
        raise ValueError(f"--cpu-bind is one of {', '.join(CPU_BIND_MODES)}, got {options.cpu_bind!r}")
    targets = load_targets(options.targets) if options.targets else None
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = MODELS[options.model]
    results: dict[str, Any] = {
        "meta": {
            "command": options.command,
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "model": options.model,
            "model_description": spec.description,
            "steps": options.steps or spec.steps,
            "warmup_steps": spec.warmup_steps if options.warmup is None else options.warmup,
            "seed": options.seed,
            "baseline": options.baseline,
            "cpu_bind": options.cpu_bind,
            "targets_file": options.targets,
            "options": _jsonable(dataclasses.asdict(options)),
            "machine": _machine_info(),
        },
        "points": [],
        "throttled": [],
        "throttled_skipped": None,
        "failures": [],
    }
    runner = Runner(options, say)
    points = [] if options.skip_grid else grid(options)
    say(f"pcpp bench: {len(points)} point(s), output in {out}/")
    for point in points:
        try:
            results["points"].append(runner.run_point(point))
        except PointFailed as exc:
            say(f"  {point.key} FAILED: {exc}")
            results["failures"].append({"key": point.key, "error": str(exc)})
        _save(out, results)
    if options.throttle:
        _run_throttled(options, runner, results, say)
    results["meta"]["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    write_outputs(results, out, targets=targets, plots=options.plots, say=say)
    return results


def _run_throttled(options: BenchOptions, runner: Runner, results: dict[str, Any], say) -> None:
    from . import netns

    reason = netns.unavailable()
    if reason is not None:
        results["throttled_skipped"] = reason
        say(f"throttled-link points skipped: {reason}")
        return
    points = throttled_grid(options)
    if any(p.transport == "mpi" for p in points):
        raise ValueError("the throttled-link mode runs zmq or torch, one rank per namespace")
    say(f"throttled link: {len(points)} point(s) over a veth pair between two network namespaces")
    with netns.link_pair() as pair:
        current = object()
        for point in points:
            if point.link != current:
                netns.set_rate(pair, None if point.link == "veth" else point.link)
                current = point.link
            try:
                record = runner.run_point(point, pair)
                record["namespaces"] = list(pair.names)
                results["throttled"].append(record)
            except PointFailed as exc:
                say(f"  {point.key} FAILED: {exc}")
                results["failures"].append({"key": point.key, "error": str(exc)})
            _save(Path(options.out), results)


def _save(out: Path, results: dict[str, Any]) -> None:
    write_json(out / "results.json", results, indent=1)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
