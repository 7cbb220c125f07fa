"""What every preparation step shares: run options, the requested CLIP (loaded only when needed),
reuse of finished tables, and the closing summary."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clip_scstclipcap import CaptioningClip, check_clip_metadata, clip_metadata, read_table_description

from .sources import DataPrepError, SkipReport
from .tables import report_path, table_exists


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_num_workers() -> int:
    return min(4, os.cpu_count() or 1)


@dataclass
class RunOptions:
    """How to run feature extraction and whether finished tables are rebuilt."""

    batch_size: int = 64
    num_workers: int = field(default_factory=default_num_workers)
    device: str = field(default_factory=default_device)
    overwrite: bool = False
    progress: bool = True


@dataclass
class ClipRequest:
    """The CLIP a command was asked to use; the model is loaded on first use only."""

    model_name: str
    pretrained: str | None = None
    device: str = "cpu"
    _loaded: CaptioningClip | None = field(default=None, repr=False)

    def expected(self) -> dict:
        """Metadata to compare tables with, before loading anything (D is not known yet)."""
        return clip_metadata(self.model_name, self.pretrained, None, True)

    def load(self) -> CaptioningClip:
        if self._loaded is None:
            try:
                self._loaded = CaptioningClip.load(self.model_name, self.pretrained, self.device)
            except (OSError, ValueError, RuntimeError) as error:
                raise DataPrepError(f"cannot load CLIP {self.model_name} (pretrained {self.pretrained}): {error}") from error
        return self._loaded


def table_description(kind: str, clip_meta: dict, **extra) -> dict:
    """The JSON stored in a table's DatasetInfo.description."""
    return {"table": kind, "clip": clip_meta, **extra}


def reusable(table: Path, clip: ClipRequest | None, options: RunOptions, what: str) -> bool:
    """True when `table` is finished and may be reused; a reused table must match the requested CLIP."""
    if options.overwrite or not table_exists(table):
        return False
    if clip is not None:
        check_clip_metadata(read_table_description(table)["clip"], clip.expected(),
                            f"existing {what} {table} (use --overwrite to rebuild it)")
    return True


def reused_report(table: Path) -> SkipReport:
    """The report of a reused table, read back for the summary."""
    saved = json.loads(report_path(table).read_text()) if report_path(table).is_file() else {}
    report = SkipReport(saved.get("table", str(table)), saved.get("inputs", []), saved.get("kept", 0))
    report.counts.update(saved.get("skipped_by_reason", {}))
    return report


def require_rows(report: SkipReport, table: Path) -> None:
    if report.kept == 0:
        raise DataPrepError(f"nothing usable left for {table}: {report.summary()}; "
                            f"every skipped item is listed in {report_path(table)}")
