"""What the host and the guest say to each other through the shared work directory.

The host writes :data:`REQUEST` (which scenarios to run) and :data:`COMMAND` (the shell line the
guest's init runs), then boots. The guest runner appends one JSON object per line to
:data:`RESULTS` as it goes, so a guest that hangs or dies still leaves what it finished:

* ``{"kind": "runner", "event": "started" | "ready" | "finished", "uptime": s, ...}``;
* ``{"kind": "scenario", "name": ..., "status": ..., "facts": {...}, ...}``, one per scenario
  (:class:`ScenarioResult`).

The guest's init writes the command's exit status to :data:`EXIT` just before it powers off.
Imported on both sides, so it uses the standard library only.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "COMMAND",
    "CONSOLE",
    "EXIT",
    "PYCACHE",
    "REQUEST",
    "RESULTS",
    "Request",
    "RunnerEvent",
    "ScenarioResult",
    "Status",
    "parse_results",
]

REQUEST = "request.json"
RESULTS = "results.jsonl"
COMMAND = "guest-command"
EXIT = "guest-exit"
CONSOLE = "console.log"
#: The byte-code cache (PYTHONPYCACHEPREFIX) the host fills and the guest mounts read-only.
PYCACHE = "pycache"


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """The scenarios to run, in this order."""

    scenarios: tuple[str, ...]

    def dumps(self) -> str:
        return json.dumps({"scenarios": list(self.scenarios)})

    @classmethod
    def loads(cls, text: str) -> Request:
        raw = json.loads(text)
        return cls(scenarios=tuple(str(name) for name in raw["scenarios"]))


class Status(enum.Enum):
    """How a scenario ended in the guest. The host asserts on its facts either way."""

    COMPLETED = "completed"  # ran to its end; its facts say whether the kernel did its part
    FAILED = "failed"  # raised: it could not go on (the error says why)
    TIMED_OUT = "timed_out"  # hit its own deadline in the guest


@dataclass(frozen=True, slots=True, kw_only=True)
class ScenarioResult:
    """One scenario's record. ``facts`` are what it observed, for the host test to judge;
    ``leftovers`` are sessions and node records the runner found (and removed) after it."""

    name: str
    status: Status
    error: str | None = None
    facts: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    leftovers: tuple[str, ...] = ()
    started_uptime: float = 0.0
    elapsed_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "scenario",
            "name": self.name,
            "status": self.status.value,
            "error": self.error,
            "facts": dict(self.facts),
            "notes": list(self.notes),
            "leftovers": list(self.leftovers),
            "started_uptime": self.started_uptime,
            "elapsed_s": self.elapsed_s,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ScenarioResult:
        return cls(
            name=str(raw["name"]),
            status=Status(raw["status"]),
            error=raw.get("error"),
            facts=dict(raw.get("facts") or {}),
            notes=tuple(raw.get("notes") or ()),
            leftovers=tuple(raw.get("leftovers") or ()),
            started_uptime=float(raw.get("started_uptime", 0.0)),
            elapsed_s=float(raw.get("elapsed_s", 0.0)),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RunnerEvent:
    """A milestone of the runner itself; ``uptime`` is the guest's, in seconds since boot."""

    event: str
    uptime: float
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "runner", "event": self.event, "uptime": self.uptime, **self.details}


def parse_results(
    lines: Sequence[str],
) -> tuple[list[RunnerEvent], dict[str, ScenarioResult], list[str]]:
    """Runner events, scenario results by name, and the lines that did not parse (a guest cut
    off mid-write leaves at most one)."""
    events: list[RunnerEvent] = []
    results: dict[str, ScenarioResult] = {}
    broken: list[str] = []
    for line in lines:
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            if raw.get("kind") == "scenario":
                result = ScenarioResult.from_json(raw)
                results[result.name] = result
            elif raw.get("kind") == "runner":
                details = {k: v for k, v in raw.items() if k not in ("kind", "event", "uptime")}
                events.append(
                    RunnerEvent(event=raw["event"], uptime=float(raw["uptime"]), details=details)
                )
            else:
                broken.append(line)
        except (ValueError, KeyError, TypeError, AttributeError):
            broken.append(line)
    return events, results, broken
