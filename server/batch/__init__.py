"""Batch runs: a file of requests through the one ImageService path, with a crash-safe
append-only manifest, resume, a hard USD cap, near-duplicate flags and a dry-run cost
projection. FastAPI-free: `imagegen batch` (server/batch_cmd.py) and POST /v1/batches
(server/http/batches.py) both drive it: rows (`read_rows`, `rows_from_bytes`,
`rows_from_objects`) -> `BatchFolder.open` -> `run_batch`, or `plan_batch` for a dry run.

One subject per module: rows (input and validation), manifest (its lines and the append-only
mechanics), folder (the output folder and its sidecars), archive (what a folder gives back),
budget (the cap as pure arithmetic), plan (the dry run), duplicates, run."""

from server.batch.archive import rendered_manifest, write_archive
from server.batch.budget import Budget, RowCost, Verdict
from server.batch.duplicates import DuplicateIndex
from server.batch.errors import FIELD_NAMES, BatchError
from server.batch.folder import (
    BATCH_ID_PREFIX,
    SEEDS_NAME,
    STATE_NAME,
    BatchFolder,
    new_batch_id,
)
from server.batch.manifest import (
    MANIFEST_NAME,
    ManifestEntry,
    RowStatus,
    finished_rows,
    json_line,
    read_manifest,
)
from server.batch.plan import BatchPlan, ModelProjection, RowProblem, plan_batch
from server.batch.rows import (
    KNOWN_FIELDS,
    BatchDefaults,
    BatchRow,
    parse_csv,
    parse_jsonl,
    read_rows,
    request_from_fields,
    rows_fingerprint,
    rows_from_bytes,
    rows_from_objects,
)
from server.batch.run import BatchOptions, BatchSummary, RowCallback, run_batch

__all__ = [
    "BATCH_ID_PREFIX",
    "FIELD_NAMES",
    "KNOWN_FIELDS",
    "MANIFEST_NAME",
    "SEEDS_NAME",
    "STATE_NAME",
    "BatchDefaults",
    "BatchError",
    "BatchFolder",
    "BatchOptions",
    "BatchPlan",
    "BatchRow",
    "BatchSummary",
    "Budget",
    "DuplicateIndex",
    "ManifestEntry",
    "ModelProjection",
    "RowCallback",
    "RowCost",
    "RowProblem",
    "RowStatus",
    "Verdict",
    "finished_rows",
    "json_line",
    "new_batch_id",
    "parse_csv",
    "parse_jsonl",
    "plan_batch",
    "read_manifest",
    "read_rows",
    "rendered_manifest",
    "request_from_fields",
    "rows_fingerprint",
    "rows_from_bytes",
    "rows_from_objects",
    "run_batch",
    "write_archive",
]
