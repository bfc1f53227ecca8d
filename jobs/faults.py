"""Fault injection for the resume and kill tests, kept out of the user-facing ``TrainConfig``.

The driver reads ``$CROSSLAYER_FAULTS`` (a JSON object of ``FaultPlan`` fields) when it sets a run up and hands
the plan to the workers with the rest of the ``WorkerPlan``; unset, nothing is injected. Example:
``CROSSLAYER_FAULTS='{"crash_at_step": 25}' crosslayer train ...`` makes rank 0 fail after step 25 on an attempt
that did not resume, so a rerun with the same run name must resume from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

ENV = "CROSSLAYER_FAULTS"


@dataclass
class FaultPlan:
    crash_at_step: int | None = None  # rank 0 raises after this step, on an attempt that did not resume
    pid_dir: str | None = None  # each worker writes rank<r>.pid here (so a test can kill one)
    step_sleep_s: float = 0.0  # sleep after every step, to give a test time to act

    def __post_init__(self) -> None:
        if self.crash_at_step is not None and (isinstance(self.crash_at_step, bool) or self.crash_at_step < 1):
            raise ValueError(f"{ENV}: crash_at_step must be an integer >= 1, got {self.crash_at_step!r}")
        if self.step_sleep_s < 0:
            raise ValueError(f"{ENV}: step_sleep_s must be >= 0, got {self.step_sleep_s}")
        if self.pid_dir:
            self.pid_dir = os.path.abspath(self.pid_dir)  # workers may run in another folder

    @classmethod
    def from_env(cls) -> FaultPlan:
        text = os.environ.get(ENV, "").strip()
        if not text:
            return cls()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{ENV} is not JSON ({err}); e.g. {ENV}='{{\"crash_at_step\": 25}}'") from err
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) - known:
            raise ValueError(f"{ENV} must be a JSON object with keys among {sorted(known)}, got {text!r}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
