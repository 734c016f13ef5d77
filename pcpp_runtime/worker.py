"""One process of a ``pcpp generate`` job: run it, write its files, say how it went.

``pcpp generate`` builds a :class:`GenerateJob` from its flags and hands it to :func:`execute`
with the ranks to run on. With ``--nproc N`` and a process transport it starts N copies of

    python -m pcpp_runtime.worker '<the job as JSON>'

through the local launcher instead: each child reads the job as data (:meth:`GenerateJob.from_json`),
finds its rank in the launcher's environment and calls :func:`execute`. Rank 0 writes the image
and the report and prints the summary; every rank prints its own errors.

Exit codes: 0 done; 2 the job cannot run as asked (bad shape, model, launcher environment),
found before any rank waits on another; 1 a rank could not connect or failed while generating.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

from .config import ConfigError, ParallelConfig
from .connect import TransportSettings
from .jobs import JobSpec, run
from .ranks import Launched, RankFailed, Ranks, Threads

__all__ = ["GenerateJob", "execute", "main", "quiet_libraries"]

PROG = "pcpp generate"


@dataclasses.dataclass(frozen=True)
class GenerateJob:
    """Everything ``pcpp generate`` was asked, as data: what to generate, how to split it, over
    which transport, and where the results go (rank 0)."""

    spec: JobSpec
    config: ParallelConfig
    transport: str = "local"
    settings: TransportSettings = TransportSettings()
    device: str | None = None
    compare: bool = False
    output: str | None = None
    report: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "config": self.config.to_dict(),
            "transport": self.transport,
            "settings": dataclasses.asdict(self.settings),
            "device": self.device,
            "compare": self.compare,
            "output": self.output,
            "report": self.report,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerateJob:
        config = dict(data["config"])
        if config.get("weights") is not None:
            config["weights"] = tuple(config["weights"])
        settings = dict(data["settings"])
        if settings.get("port_range") is not None:
            settings["port_range"] = tuple(settings["port_range"])
        return cls(
            spec=JobSpec(**data["spec"]),
            config=ParallelConfig(**config),
            transport=data["transport"],
            settings=TransportSettings(**settings),
            device=data["device"],
            compare=data["compare"],
            output=data["output"],
            report=data["report"],
        )


def execute(job: GenerateJob, ranks: Ranks) -> int:
    """Run ``job`` on ``ranks`` (:func:`pcpp_runtime.jobs.run`); rank 0 writes the image and the
    report and prints a summary. Returns the exit code (see the module docstring)."""
    from .launch import LaunchEnvironmentError, discover

    quiet_libraries()
    if isinstance(ranks, Threads):
        try:
            launched = discover()
        except LaunchEnvironmentError:
            launched = None
        if launched is not None and launched.world_size > 1:
            return _usage_error(
                f"this process is rank {launched.rank} of {launched.world_size} started by {launched.source}; "
                "the local transport runs ranks as threads of one process: choose --transport torch, mpi or zmq"
            )
    try:
        result = run(job.spec, job.config, ranks, compare=job.compare, device=job.device)
    except (ConfigError, ValueError, KeyError, FileNotFoundError) as exc:  # ShapeError, LaunchEnvironmentError too
        return _usage_error(str(exc))
    except RankFailed as exc:
        print(f"{PROG}: {exc}", file=sys.stderr, flush=True)
        return 1
    if result is not None:
        result.write(job.output, job.report)
        lines = [result.summary()]
        if job.output:
            lines.append(f"  image: {job.output}")
        if job.report:
            lines.append(f"  report: {job.report}")
        print("\n".join(lines), flush=True)
    return 0


def _usage_error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return 2


def quiet_libraries() -> None:
    """diffusers/transformers chatter (weight-loading bars, torchvision notices) hides our output."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    """``python -m pcpp_runtime.worker JOB_JSON``: one rank that a launcher started."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m pcpp_runtime.worker '<job as JSON>' (started by pcpp generate --nproc N)", file=sys.stderr)
        return 2
    try:
        job = GenerateJob.from_json(json.loads(argv[0]))
    except (ValueError, KeyError, TypeError) as exc:
        return _usage_error(f"this is not a job pcpp generate wrote: {type(exc).__name__}: {exc}")
    return execute(job, Launched(job.transport, job.settings))


if __name__ == "__main__":
    sys.exit(main())
