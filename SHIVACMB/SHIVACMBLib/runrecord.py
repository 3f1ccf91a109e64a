"""run.json, typed: what one `segment` run records, written and read only through :class:`RunRecord`.

Its top-level keys are the record's fields, in the order written; reading refuses a record
with a key missing or one it does not know (:class:`RunRecordError`), so a renamed key fails
where it is read instead of blanking a table cell. The sections below the top level are the
summaries of their owners (``Scan``, ``BrainMask``, ``ModelDescriptor``, ``FoldEnsemble``,
``location.locate``...); the properties name what other modules read of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

PathLike = Union[str, Path]
NOT_LOCATED = "not computed"  # location.source of a run that did not locate its CMBs


class RunRecordError(ValueError):
    """A run.json that is not a record of this version: a key missing or unknown, or not JSON."""


@dataclass
class RunRecord:
    """One run.json."""

    scan_id: str
    software: Dict[str, Any]
    input: Dict[str, Any]
    mask: Dict[str, Any]
    model: Dict[str, Any]
    settings: Dict[str, Any]
    inference: Dict[str, Any]
    model_box: Dict[str, Any]
    results: Dict[str, Any]
    fp_filter: Optional[Dict[str, Any]]
    location: Dict[str, Any]
    warnings: List[str]
    started: str
    batch: Optional[Dict[str, Any]] = None  # `shivacmb batch`: fingerprint and run id; left out when None
    timings_s: Dict[str, float] = field(default_factory=dict)
    finished: str = ""

    @property
    def provider(self) -> str:
        return str(self.inference["provider"])

    @property
    def files(self) -> List[str]:
        """The run's output files, run.json last."""
        return list(self.results.get("files", []))

    @property
    def fingerprint(self) -> Optional[Dict[str, Any]]:
        """The batch fingerprint the run was made with (None outside a batch)."""
        return None if self.batch is None else self.batch["fingerprint"]

    @property
    def located(self) -> bool:
        return self.location["source"] != NOT_LOCATED

    def to_dict(self) -> Dict[str, Any]:
        data = {item.name: getattr(self, item.name) for item in fields(self)}
        if data["batch"] is None:
            del data["batch"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> "RunRecord":
        """The record of a parsed run.json; RunRecordError when a key is missing or unknown."""
        if not isinstance(data, dict):
            raise RunRecordError("run.json does not hold a JSON object")
        names = {item.name for item in fields(cls)}
        required = names - {"batch"}
        missing, unknown = sorted(required - set(data)), sorted(set(data) - names)
        if missing or unknown:
            raise RunRecordError("run.json " + "; ".join(
                part for part in (f"lacks {', '.join(missing)}" if missing else "",
                                  f"has unknown {', '.join(unknown)}" if unknown else "") if part))
        return cls(**data)

    @classmethod
    def read(cls, path: PathLike) -> "RunRecord":
        """The record in a run.json file; OSError when it cannot be read, RunRecordError when it is not one."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except ValueError as err:
            raise RunRecordError(f"{path}: not JSON: {err}") from None
        try:
            return cls.from_dict(data)
        except RunRecordError as err:
            raise RunRecordError(f"{path}: {err}") from None


def read_if_valid(path: PathLike) -> Optional[RunRecord]:
    """The record in ``path``, or None when there is none or it is not one of this version."""
    try:
        return RunRecord.read(path)
    except (OSError, RunRecordError):
        return None
