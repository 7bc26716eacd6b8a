"""Batch jobs over HTTP: the body of POST /v1/batches (an inline list, or a JSONL or CSV upload)
read into server.batch rows; the dry-run projection; batches run by server.batch in folders
under data_dir/batches/<id> as jobs of the JobRunner (one record, cancel and progress events
with generation jobs), published to the blob store as they go (server/http/batch_folders.py);
and what the result routes read back, in whichever process."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from server import errors
from server.batch import (
    BATCH_ID_PREFIX,
    MANIFEST_NAME,
    BatchDefaults,
    BatchFolder,
    BatchOptions,
    BatchRow,
    ManifestEntry,
    json_line,
    new_batch_id,
    plan_batch,
    read_manifest,
    rendered_manifest,
    rows_fingerprint,
    rows_from_bytes,
    rows_from_objects,
    run_batch,
    write_archive,
)
from server.http.batch_folders import BatchFolders
from server.http.errors import NotFoundError
from server.http.forms import read_form
from server.http.jobs import JobRunner, LiveJob
from server.http.protocol import (
    Batch,
    BatchCounts,
    BatchCreateRequest,
    BatchDryRun,
    BatchModelProjection,
    BatchOptionsFields,
    BatchRowProblem,
    Job,
)
from server.http.serving import Readiness
from server.quotas import IN_PROCESS, Caller
from server.service import ImageService
from server.settings import Settings

log = logging.getLogger(__name__)

BATCHES_DIR = "batches"
_MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp"}
_FORM_TYPES = frozenset({"multipart/form-data", "application/x-www-form-urlencoded"})
# A batch form is one file and a handful of options; a few more files are read only to say
# "send one file", and past these the parser refuses.
MAX_FORM_FILES = 4
MAX_FORM_FIELDS = 32


@dataclass(frozen=True)
class BatchSubmission:
    """A POST /v1/batches body, validated: every row (a bad one carries its error) and the
    options."""

    rows: list[BatchRow]
    options: BatchOptionsFields
    # "inline", or "upload:<file name>".
    source: str


# ---------------------------------------------------------------------------------------------
# The edge: JSON body or form upload -> BatchSubmission.
# ---------------------------------------------------------------------------------------------


async def read_submission(request: Request) -> BatchSubmission:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type in _FORM_TYPES:
        form = await read_form(
            request,
            max_files=MAX_FORM_FILES,
            max_fields=MAX_FORM_FIELDS,
            param="file",
            bounds="one file, 'file', and the batch options as form fields",
        )
        try:
            return await submission_from_form(form)
        finally:
            await form.close()
    return submission_from_json(await request.body())


def submission_from_json(raw: bytes) -> BatchSubmission:
    try:
        # Decoded by Python, not pydantic's JSON parser: a string that JSON allows but UTF-8
        # cannot encode (a lone surrogate) fails its own row, naming the field.
        decoded = json.loads(raw)
    except ValueError:
        invalid = {"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error"}
        raise RequestValidationError([invalid]) from None
    try:
        body = BatchCreateRequest.model_validate(decoded)
    except ValidationError as exc:
        # The app's one validation handler turns it into the 400 envelope naming the field.
        raise RequestValidationError(exc.errors(include_url=False)) from None
    defaults = BatchDefaults(model=body.model, preset=body.preset)
    options = BatchOptionsFields.model_validate(body.model_dump(exclude={"requests"}))
    return BatchSubmission(
        rows=rows_from_objects(body.requests, defaults), options=options, source="inline"
    )


async def submission_from_form(form: FormData) -> BatchSubmission:
    files = form.getlist("file")
    if len(files) != 1:
        raise errors.InvalidRequestError(
            "file is required: upload the requests as one multipart field 'file' (JSONL, one "
            "JSON object per line, or CSV with a header row)"
            if not files
            else f"file was sent {len(files)} times; send one file per batch",
            param="file",
        )
    fields: dict[str, str] = {}
    for name, value in form.multi_items():
        if name == "file":
            continue
        if not isinstance(value, str):
            raise errors.InvalidRequestError(
                f"{name} must be a form value, not a file; only 'file' holds the requests",
                param=name,
            )
        if value.strip():  # an empty field means "not given"
            fields[name] = value.strip()
    try:
        # Form values are all strings: read laxly ("2" is 2, "true" is true).
        options = BatchOptionsFields.model_validate(fields, strict=False)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None
    upload = files[0]
    if isinstance(upload, UploadFile):
        data, filename = await upload.read(), upload.filename or ""
        content_type = (upload.content_type or "").split(";")[0].strip().lower()
    else:
        data, filename, content_type = upload.encode("utf-8"), "", ""
    defaults = BatchDefaults(model=options.model, preset=options.preset)
    rows = rows_from_bytes(data, name=filename, content_type=content_type, defaults=defaults)
    return BatchSubmission(rows=rows, options=options, source=f"upload:{filename}")


# ---------------------------------------------------------------------------------------------
# Running batches and reading their folders.
# ---------------------------------------------------------------------------------------------


class _ManifestNames:
    """The image names of recently read manifests, read again only when the file changes:
    a client fetching every file of a large batch must not make each fetch parse it all."""

    KEEP = 32

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[Path, tuple[tuple[int, int], frozenset[str]]] = {}

    def get(self, manifest: Path) -> frozenset[str]:
        try:
            info = manifest.stat()
        except FileNotFoundError:
            return frozenset()
        version = (info.st_size, info.st_mtime_ns)
        with self._lock:
            seen = self._seen.get(manifest)
        if seen is not None and seen[0] == version:
            return seen[1]
        names = frozenset(n for e in read_manifest(manifest).values() for n in e.images)
        with self._lock:
            self._seen.pop(manifest, None)
            while len(self._seen) >= self.KEEP:
                del self._seen[next(iter(self._seen))]
            self._seen[manifest] = (version, names)
        return names


class BatchesServing:
    def __init__(
        self, settings: Settings, service: ImageService, jobs: JobRunner, readiness: Readiness
    ) -> None:
        self.settings = settings
        self.service = service
        self.jobs = jobs
        self.readiness = readiness
        self.root = settings.data_dir / BATCHES_DIR
        self.folders = BatchFolders(self.root, service.store.batch_blobs)
        self._db = service.db
        self._names = _ManifestNames()

    def prune(self) -> int:
        """Remove batch folders (here and in the blob store) whose job record is gone (purged
        after the retention period): the files go with the record instead of lingering
        unreachable. One process at a time."""
        removed = 0
        with self._db.exclusive("batch-prune") as mine:
            if not mine:
                return 0
            for batch_id in self.folders.published_ids():
                if batch_id.startswith(BATCH_ID_PREFIX) and self.jobs.store.get(batch_id) is None:
                    self.folders.remove(batch_id)
                    removed += 1
        return removed

    # -- creating ------------------------------------------------------------------------

    def plan(self, submission: BatchSubmission) -> BatchDryRun:
        """Every row checked as a run would and priced; nothing is run, spent or written."""
        plan = plan_batch(self.service, submission.rows)
        return BatchDryRun(
            total=plan.total,
            valid=plan.valid,
            invalid=len(plan.problems),
            problems=[
                BatchRowProblem(row=p.row, line=p.line, message=p.message, param=p.param)
                for p in plan.problems
            ],
            models=[
                BatchModelProjection(
                    provider=m.provider,
                    model=m.model,
                    rows=m.rows,
                    images=m.images,
                    cached_rows=m.cached_rows,
                    usd=m.usd,
                    unpriced_rows=m.unpriced_rows,
                    basis=m.basis,
                )
                for m in plan.models
            ],
            cost_by_provider=plan.by_provider(),
            projected_usd=plan.usd,
            unpriced_rows=plan.unpriced_rows,
        )

    async def submit(
        self, submission: BatchSubmission, base_url: str, caller: Caller = IN_PROCESS
    ) -> Batch:
        self.readiness.check()
        rows = submission.rows
        opts = submission.options
        options = BatchOptions(
            concurrency=opts.concurrency, budget_usd=opts.budget_usd, caller=caller
        )
        fingerprint = rows_fingerprint(rows)
        path = await asyncio.to_thread(self._create_folder, fingerprint, submission.source)
        record = {
            "total": len(rows),
            "concurrency": opts.concurrency,
            "budget_usd": opts.budget_usd,
            "model": opts.model,
            "preset": opts.preset,
            "source": submission.source,
            "invalid_rows": [
                BatchRowProblem(
                    row=r.row, line=r.line, message=r.error or "invalid row", param=r.param
                ).model_dump()
                for r in rows
                if r.request is None
            ],
        }

        async def work(job: LiveJob) -> dict[str, Any]:
            return await self._run(job, rows, path, fingerprint, options, submission.source)

        job = self.jobs.launch(path.name, kind="batch", request=record, work=work)
        return self._view(job, record, BatchCounts(total=len(rows), pending=len(rows)), base_url)

    def _create_folder(self, fingerprint: str, source: str) -> Path:
        """A new batch folder named by its batch id (the job id and the ledger tag alike);
        the job opens it again to run (nothing recorded yet, so it keeps the id)."""
        batch_id = new_batch_id()
        path = self.root / batch_id
        with BatchFolder.open(
            path, fingerprint=fingerprint, resume=False, source=source, batch_id=batch_id
        ):
            return path

    async def _run(
        self,
        job: LiveJob,
        rows: Sequence[BatchRow],
        path: Path,
        fingerprint: str,
        options: BatchOptions,
        source: str,
    ) -> dict[str, Any]:
        outcomes: dict[int, ManifestEntry] = {}

        loop = asyncio.get_running_loop()

        def on_row(entry: ManifestEntry) -> None:
            outcomes[entry.row] = entry
            job.result = self._counts(job.id, outcomes.values(), len(rows)).model_dump()
            detail = {**job.result, "row": _row_event(entry)}
            self.jobs.report(job, len(outcomes), len(rows), detail)
            # Off the loop, not waited for: the final publish below catches up on anything
            # these have not done.
            loop.run_in_executor(None, self._publish_quietly, job.id)

        # On the loop (a few small file operations): opened in a thread, a cancel arriving
        # meanwhile would leave the folder open with no one to close it.
        folder = BatchFolder.open(path, fingerprint=fingerprint, resume=False, source=source)
        try:
            await run_batch(self.service, rows, folder, options=options, on_row=on_row)
        finally:
            # Synchronously, so that a cancelled run still closes the folder: at most one
            # manifest append (a write and an fsync) is waited for.
            folder.close()
            job.result = self._counts(job.id, folder.latest.values(), len(rows)).model_dump()
            # Shielded: a cancelled batch still publishes what it recorded.
            await asyncio.shield(asyncio.to_thread(self._publish_quietly, job.id))
            self.folders.finished(job.id)
        return job.result

    def _publish_quietly(self, batch_id: str) -> None:
        try:
            self.folders.publish(batch_id)
        except Exception:
            log.exception("batch %s: publishing its folder to the blob store failed", batch_id)

    def _folder(self, batch_id: str) -> Path:
        """Where to read the batch from here (server/http/batch_folders.py). Blocking."""
        return self.folders.view(batch_id, local=batch_id in self.jobs.live)

    # -- reading -------------------------------------------------------------------------

    async def get(self, batch_id: str, base_url: str) -> Batch:
        record = self._record(batch_id)
        job = self.jobs.get(batch_id)
        entries = await self._entries(batch_id)
        counts = self._counts(batch_id, entries, int(record["total"]))
        return self._view(job, record, counts, base_url)

    async def cancel(self, batch_id: str, base_url: str) -> Batch:
        self._record(batch_id)
        await self.jobs.cancel(batch_id)
        return await self.get(batch_id, base_url)

    async def manifest(self, batch_id: str, base_url: str) -> bytes:
        """The manifest as JSON lines in row order, each with the `sha256` and `urls` of its
        images (`images` stay file names, relative to the batch folder and the archive)."""
        self._record(batch_id)
        files_url = f"{self._base(base_url)}/v1/batches/{batch_id}/files/"
        folder = await asyncio.to_thread(self._folder, batch_id)
        objects = await asyncio.to_thread(rendered_manifest, folder, files_url)
        return b"".join(json_line(obj) for obj in objects)

    async def file(self, batch_id: str, name: str) -> tuple[Path, str]:
        """An image of the batch: only names its manifest lists are served."""
        self._record(batch_id)
        folder = await asyncio.to_thread(self._folder, batch_id)
        names = await asyncio.to_thread(self._names.get, folder / MANIFEST_NAME)
        listed = name in names and PurePosixPath(name).name == name
        path = await asyncio.to_thread(self.folders.fetch, batch_id, name) if listed else None
        if path is None:
            raise NotFoundError(
                f"batch '{batch_id}' has no file '{name}'; its manifest lists the files",
                param="name",
            )
        return path, _MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")

    async def archive(self, batch_id: str) -> Path:
        """A zip of the manifest (as GET .../manifest gives it, less the URLs) and the images
        it names, in a temporary file that the caller removes."""
        self._record(batch_id)
        live = batch_id in self.jobs.live
        folder = await asyncio.to_thread(
            self.folders.path if live else self.folders.fetch_all, batch_id
        )
        return await asyncio.to_thread(write_archive, folder)

    def _record(self, batch_id: str) -> dict[str, Any]:
        found = self.jobs.store.request_of(batch_id)
        # Only ids of batch records become paths: nothing else names a folder.
        if found is None or found[0] != "batch" or not batch_id.startswith(BATCH_ID_PREFIX):
            raise NotFoundError(f"no batch with id '{batch_id}'", param="batch_id")
        return found[1]

    async def _entries(self, batch_id: str) -> list[ManifestEntry]:
        folder = await asyncio.to_thread(self._folder, batch_id)
        return list((await asyncio.to_thread(read_manifest, folder / MANIFEST_NAME)).values())

    def _counts(self, batch_id: str, entries: Iterable[ManifestEntry], total: int) -> BatchCounts:
        outcomes = list(entries)
        done = [e for e in outcomes if e.status == "done"]
        return BatchCounts(
            total=total,
            done=len(done),
            failed=sum(e.status == "failed" for e in outcomes),
            cached=sum(e.cached for e in done),
            skipped_budget=sum(e.status == "skipped_budget" for e in outcomes),
            pending=total - len(outcomes),
            images=sum(len(e.images) for e in done),
            # The ledger, not the manifest: failed attempts that cost something count too.
            cost_usd=self.service.spent(batch_id),
            saved_usd=sum(e.saved_usd for e in done),
        )

    def _view(
        self, job: Job, record: Mapping[str, Any], counts: BatchCounts, base_url: str
    ) -> Batch:
        base = f"{self._base(base_url)}/v1/batches/{job.id}"
        return Batch(
            **counts.model_dump(),
            id=job.id,
            created=job.created,
            status=job.status,
            concurrency=int(record.get("concurrency", 1)),
            budget_usd=record.get("budget_usd"),
            model=record.get("model"),
            preset=record.get("preset"),
            invalid_rows=[BatchRowProblem(**p) for p in record.get("invalid_rows", ())],
            manifest_url=f"{base}/manifest",
            archive_url=f"{base}/archive",
            error=job.error,
        )

    def _base(self, base_url: str) -> str:
        return (self.settings.server.public_base_url or base_url).rstrip("/")


def _row_event(entry: ManifestEntry) -> dict[str, Any]:
    return {
        "row": entry.row,
        "line": entry.line,
        "status": entry.status,
        "cached": entry.cached,
        "images": list(entry.images),
        "error": entry.error,
    }
