"""Batch runs on the real tiny pipeline: input parsing with line numbers, one bad row failing
alone, CSV input, cache-served repeats, near-duplicate flags, the budget cap, dry-run cost
projection, and resuming after a torn manifest line."""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from models.base import (
    NO_EVENTS,
    Backend,
    BackendIdentity,
    BackendResult,
    Events,
    GeneratedImage,
    GenerationParams,
    ModelSpec,
)
from models.catalogue import Catalogue
from server import batch_cmd, errors
from server.batch import (
    MANIFEST_NAME,
    SEEDS_NAME,
    BatchDefaults,
    BatchError,
    BatchFolder,
    BatchOptions,
    DuplicateIndex,
    ManifestEntry,
    parse_csv,
    parse_jsonl,
    read_manifest,
    rows_fingerprint,
    rows_from_objects,
    run_batch,
)
from server.db import Database
from server.ledger import Ledger, LedgerRow
from server.quality import near_duplicates
from server.registry import BackendRegistry
from server.service import ImageRequest, ImageService
from server.settings import Settings


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def ledger_rows(settings: Settings, tag: str) -> list[dict[str, Any]]:
    db = Database(settings.db_path)
    try:
        return Ledger(db).rows(tag=tag, limit=100_000)
    finally:
        db.close()


def generated_per_seed(settings: Settings, tag: str) -> Counter[int]:
    """How many times each seed was really generated (not served from the cache)."""
    counts: Counter[int] = Counter()
    for row in ledger_rows(settings, tag):
        if not row["cached"] and row["status"] == "ok":
            counts.update(json.loads(row["seeds"]))
    return counts


def batch_id(out: Path) -> str:
    return str(json.loads((out / "batch.json").read_text())["batch_id"])


# -- parsing (no model) ------------------------------------------------------------------------


def test_unknown_field_fails_that_row_naming_field_and_line() -> None:
    text = '{"prompt": "a"}\n\n{"prompt": "b", "colour": "red"}\n{"prompt": "c", "stpes": 2}\n'
    rows = parse_jsonl(text)
    assert [r.row for r in rows] == [1, 2, 3]
    assert [r.line for r in rows] == [1, 3, 4]
    assert rows[0].request == ImageRequest(prompt="a")
    assert rows[1].request is None and rows[1].param == "colour"
    assert rows[1].describe_error().startswith("line 3: unknown field 'colour'")
    assert "did you mean 'steps'" in (rows[2].error or "")


@pytest.mark.parametrize(
    ("fields", "param", "needle"),
    [
        ({"prompt": "a", "n": "two"}, "n", "n must be an integer"),
        ({"prompt": "a", "seed": True}, "seed", "seed must be an integer"),
        ({"prompt": "a", "size": "64"}, "size", "size must be WIDTHxHEIGHT"),
        ({"prompt": "a", "guidance_scale": "nan"}, "guidance_scale", "must be a number"),
        ({"prompt": "a", "output_format": "gif"}, "output_format", "png, jpeg or webp"),
        ({"prompt": 7}, "prompt", "prompt must be a string"),
        ({"seed": 1}, "prompt", "prompt is missing"),
        ({"prompt": "a", "width": 64}, "width", 'size "WIDTHxHEIGHT"'),
    ],
)
def test_field_errors_name_the_field(fields: dict[str, Any], param: str, needle: str) -> None:
    (row,) = rows_from_objects([fields])
    assert row.request is None
    assert row.param == param
    assert needle in (row.error or "")


def test_csv_rows_coerce_types_and_apply_defaults() -> None:
    text = (
        "prompt,seed,size,steps,guidance_scale,model\n"
        '"a fox, running",7,64x32,2,4.5,\n'
        "\n"
        "a cat,,,,,tiny-flux\n"
        "a dog,x,,,,\n"
    )
    rows = parse_csv(text, BatchDefaults(model="tiny-sdxl", preset="photo"))
    assert [r.line for r in rows] == [2, 4, 5]
    first = rows[0].request
    assert first == ImageRequest(
        prompt="a fox, running",
        seed=7,
        width=64,
        height=32,
        steps=2,
        guidance_scale=4.5,
        model="tiny-sdxl",
        preset="photo",
    )
    assert rows[1].request is not None and rows[1].request.model == "tiny-flux"
    assert rows[1].request.seed is None
    assert rows[2].request is None and rows[2].param == "seed"


def test_duplicate_index_agrees_with_pairwise_hamming() -> None:
    rng = random.Random(7)
    base = [rng.getrandbits(64) for _ in range(40)]
    hashes = []
    for value in base:
        hashes.append(f"{value:016x}")
        flipped = value
        for bit in rng.sample(range(64), rng.randint(0, 6)):
            flipped ^= 1 << bit
        hashes.append(f"{flipped:016x}")
    index = DuplicateIndex(4)
    found = []
    for i, h in enumerate(hashes):
        found.append(index.find(h))
        index.add(h, str(i))
    expected: dict[int, int] = {}
    for i, j in near_duplicates(hashes, 4):
        expected.setdefault(j, i)
        expected[j] = min(expected[j], i)
    assert found == [str(expected[j]) if j in expected else None for j in range(len(hashes))]


# -- runs on tiny-sdxl -------------------------------------------------------------------------


def test_bad_rows_fail_alone_and_csv_input_runs(settings: Settings, tmp_path: Path) -> None:
    src = tmp_path / "rows.csv"
    src.write_text(
        "prompt,seed,steps,n,size\n"
        "a red fox,11,2,,\n"
        "a gory scene,12,2,,\n"  # blocked by the sanitizer
        "two foxes,13,2,2,\n"
        "too many,14,2,0,\n"  # n out of range: the service says so
        "odd size,15,2,,65x64\n"  # the backend refuses it
        "a blue fox,16,steps,,\n"  # not a number: refused at the edge
        "a green fox,17,2,,\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    code = batch_cmd.run(settings, file=src, out=out, concurrency=3)
    assert code == batch_cmd.EXIT_ROWS_FAILED
    manifest = read_manifest(out / MANIFEST_NAME)
    assert sorted(manifest) == [1, 2, 3, 4, 5, 6, 7]
    status = {row: e.status for row, e in manifest.items()}
    assert status == {
        1: "done",
        2: "failed",
        3: "done",
        4: "failed",
        5: "failed",
        6: "failed",
        7: "done",
    }
    assert "content policy" in (manifest[2].error or "")
    assert manifest[4].param == "n" and manifest[5].param == "size"
    assert manifest[6].param == "steps" and manifest[6].line == 7
    assert manifest[3].seeds == (13, 14) and len(manifest[3].images) == 2
    for entry in manifest.values():
        for name in entry.images:
            assert (out / name).is_file()
    assert sorted(p.name for p in out.glob("*.png")) == sorted(
        name for e in manifest.values() for name in e.images
    )
    assert manifest[1].provider == "local" and manifest[1].cost_usd > 0
    assert manifest[1].quality[0]["ok"] is True


def test_repeated_rows_are_served_from_the_cache_and_flagged(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first_half = [{"prompt": f"lighthouse {i}", "seed": 500 + i, "steps": 2} for i in range(8)]
    src = write_jsonl(tmp_path / "rows.jsonl", first_half + first_half)
    out = tmp_path / "out"
    assert batch_cmd.run(settings, file=src, out=out, concurrency=4) == batch_cmd.EXIT_OK
    printed = capsys.readouterr().out
    assert "done 16 (cached 8)" in printed
    assert "images/s" in printed
    manifest = read_manifest(out / MANIFEST_NAME)
    for i in range(1, 9):
        original, repeat = manifest[i], manifest[i + 8]
        assert not original.cached and original.cost_usd > 0
        assert repeat.cached and repeat.cost_usd == 0.0 and repeat.gpu_seconds == 0.0
        assert repeat.saved_usd == pytest.approx(original.cost_usd)
        assert repeat.seeds == original.seeds
        assert (out / repeat.images[0]).read_bytes() == (out / original.images[0]).read_bytes()
        assert repeat.near_duplicate_of == (original.images[0],)
    assert generated_per_seed(settings, batch_id(out)) == Counter(range(500, 508))


def test_a_used_folder_needs_resume(settings: Settings, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "a", "seed": 1, "steps": 1}])
    out = tmp_path / "out"
    assert batch_cmd.run(settings, file=src, out=out) == 0
    with pytest.raises(BatchError, match="--resume"):
        batch_cmd.run(settings, file=src, out=out)
    write_jsonl(src, [{"prompt": "b", "seed": 1, "steps": 1}])
    with pytest.raises(BatchError, match="differ"):
        batch_cmd.run(settings, file=src, out=out, resume=True)


def test_a_run_that_recorded_nothing_restarts_with_its_id_and_seeds(tmp_path: Path) -> None:
    out = tmp_path / "out"
    rows = rows_from_objects([{"prompt": "a"}])
    with BatchFolder.open(out, fingerprint=rows_fingerprint(rows), resume=False) as folder:
        folder.record_seeds({1: 42})
        first = folder.batch_id
    with BatchFolder.open(out, fingerprint=rows_fingerprint(rows), resume=False) as folder:
        assert (folder.batch_id, folder.seeds) == (first, {1: 42})
    other = rows_fingerprint(rows_from_objects([{"prompt": "b"}]))
    with BatchFolder.open(out, fingerprint=other, resume=False) as folder:
        assert folder.batch_id != first and folder.seeds == {}


def test_resume_after_torn_line_reuses_persisted_seeds(settings: Settings, tmp_path: Path) -> None:
    """Seedless rows: one line torn by a kill, one row generated but never recorded. The
    resumed run regenerates both from the cache (seeds from the sidecar) and bills nothing."""
    src = write_jsonl(
        tmp_path / "rows.jsonl", [{"prompt": f"row {i}", "steps": 1} for i in range(5)]
    )
    out = tmp_path / "out"
    assert batch_cmd.run(settings, file=src, out=out, concurrency=2) == 0
    manifest_path = out / MANIFEST_NAME
    lines = manifest_path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 5
    sidecar = {
        json.loads(x)["row"]: json.loads(x)["seed"]
        for x in (out / SEEDS_NAME).read_text().splitlines()
    }
    assert len(sidecar) == 5
    # Lose the last line entirely, and tear the one before it mid-write.
    kept, torn = lines[:3], lines[3][: len(lines[3]) // 2]
    manifest_path.write_bytes(b"".join(kept) + torn)
    lost = {json.loads(x)["row"] for x in lines[3:]}
    (out / ".tmp-half-written").write_bytes(b"partial")

    assert batch_cmd.run(settings, file=src, out=out, resume=True) == 0
    manifest = read_manifest(manifest_path)
    assert sorted(manifest) == [1, 2, 3, 4, 5]
    assert all(e.status == "done" for e in manifest.values())
    assert {row for row, e in manifest.items() if e.cached} == lost
    assert {row: e.seeds[0] for row, e in manifest.items()} == sidecar
    # The torn fragment was cut off, so every line of the file is whole JSON.
    for raw in manifest_path.read_bytes().splitlines():
        ManifestEntry.from_json(json.loads(raw))
    assert not (out / ".tmp-half-written").exists()
    assert generated_per_seed(settings, batch_id(out)) == Counter(sidecar.values())


def test_local_budget_stops_at_the_cap_and_skipped_rows_run_on_resume(
    data_dir: Path, tmp_path: Path
) -> None:
    # $1 per GPU-second makes a 2-step 64x64 image cost cents, so a few reach the cap.
    settings = Settings(data_dir=data_dir, cost={"usd_per_gpu_hour": 3600.0})
    out = tmp_path / "out"
    rows = rows_from_objects(
        [{"prompt": f"budget {i}", "seed": 900 + i, "steps": 2} for i in range(48)]
    )

    async def go() -> None:
        service = ImageService(settings)
        try:
            # Warm the pipeline, then price one image to size the cap at about four images; 48
            # rows leave room for a CPU whose speed varies several-fold under load.
            for seed in (1, 2):
                calib = await service.generate(ImageRequest(prompt="calibrate", seed=seed, steps=2))
            cap = 4 * calib.cost_usd
            options = BatchOptions(concurrency=4, budget_usd=cap)
            with BatchFolder.open(out, fingerprint=rows_fingerprint(rows), resume=False) as f:
                summary = await run_batch(service, rows, f, options=options)
            manifest = read_manifest(out / MANIFEST_NAME)
            trace = [(e.row, e.status, e.cost_usd, e.reserved_usd) for e in manifest.values()]
            done = [e for e in manifest.values() if e.status == "done"]
            skipped = [e for e in manifest.values() if e.status == "skipped_budget"]
            assert summary.done == len(done) >= 1, trace
            assert summary.skipped_budget == len(skipped) >= 1, trace
            assert summary.done + summary.skipped_budget == 48
            assert all(e.reserved_usd and e.reserved_usd > 0 and not e.images for e in skipped)
            # Local device time is only known after a row ran: spend can pass the cap only by
            # what rows cost beyond their reservations (a row of unknown cost runs alone and
            # reserves nothing). On a GPU that is nothing; a loaded CPU box jitters.
            beyond = sum(
                e.cost_usd if e.reserved_usd is None else max(0.0, e.cost_usd - e.reserved_usd)
                for e in done
            )
            spent = service.ledger.spent(summary.batch_id)
            assert spent == pytest.approx(summary.cost_usd)
            assert spent <= cap + beyond + 1e-12, (cap, trace)

            # Resumed with room to spare, only the skipped rows run.
            with BatchFolder.open(out, fingerprint=rows_fingerprint(rows), resume=True) as f:
                again = await run_batch(
                    service, rows, f, options=BatchOptions(concurrency=4, budget_usd=cap * 1000)
                )
            assert again.done == 48 and again.skipped_budget == 0
            assert again.resumed == summary.done
            assert generated_per_seed(settings, summary.batch_id) == Counter(range(900, 948))
        finally:
            await service.aclose()

    asyncio.run(go())


class FixedPriceBackend(Backend):
    """A hosted-style backend that bills exactly its quoted price: the budget's arithmetic
    tested without device-time jitter."""

    def __init__(self, spec: ModelSpec, price_usd: float) -> None:
        self.spec = spec
        self.price_usd = price_usd

    @property
    def provider(self) -> str:
        return "fixedprice"

    def identity(self, params: GenerationParams) -> BackendIdentity:
        return BackendIdentity(backend="fixedprice", model_revision="1")

    def estimate_cost_usd(self, params: GenerationParams) -> float | None:
        return self.price_usd * params.n

    async def generate(
        self,
        params: GenerationParams,
        events: Events = NO_EVENTS,
        *,
        precise: bool = False,
    ) -> BackendResult:
        await asyncio.sleep(0.01)
        images = []
        for seed in params.image_seeds():
            noise = np.random.default_rng(seed).integers(0, 256, (params.height, params.width, 3))
            buf = io.BytesIO()
            Image.fromarray(noise.astype(np.uint8)).save(buf, format="PNG")
            images.append(GeneratedImage(buf.getvalue(), seed, params.width, params.height))
        return BackendResult(
            images=tuple(images), provider=self.provider, cost_usd=self.price_usd * params.n
        )


class FixedPriceRegistry(BackendRegistry):
    def _create_hosted(self, spec: ModelSpec) -> Backend:
        return FixedPriceBackend(spec, price_usd=0.01)


def test_concurrent_rows_never_overshoot_a_priced_budget(data_dir: Path, tmp_path: Path) -> None:
    model = {
        "name": "fixed-price",
        "kind": "openai",
        "source": "fixedprice",
        "defaults": {"width": 32, "height": 32},
    }
    settings = Settings(data_dir=data_dir, models=[model])
    rows = rows_from_objects(
        [{"prompt": f"priced {i}", "model": "fixed-price", "seed": i} for i in range(20)]
        + [{"prompt": "priced 0", "model": "fixed-price", "seed": 0}]  # cached: free
    )
    out = tmp_path / "out"

    async def go() -> None:
        service = ImageService(
            settings, registry=FixedPriceRegistry(settings, Catalogue.load(settings.models))
        )
        try:
            options = BatchOptions(concurrency=8, budget_usd=0.055)
            with BatchFolder.open(out, fingerprint=rows_fingerprint(rows), resume=False) as f:
                summary = await run_batch(service, rows, f, options=options)
            assert service.ledger.spent(summary.batch_id) == pytest.approx(0.05)
        finally:
            await service.aclose()
        assert (summary.done, summary.skipped_budget, summary.cached) == (6, 15, 1)
        manifest = read_manifest(out / MANIFEST_NAME)
        assert [r for r, e in sorted(manifest.items()) if e.status == "done"] == [1, 2, 3, 4, 5, 21]
        assert manifest[21].cached and manifest[21].cost_usd == 0.0
        assert all(manifest[r].reserved_usd == pytest.approx(0.01) for r in range(1, 6))

    asyncio.run(go())


def test_dry_run_projects_cost_per_provider_and_spends_nothing(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("models.hosted")
    import models.hosted

    if not hasattr(models.hosted, "make_hosted_backend"):
        pytest.skip("hosted backends are not available")
    hosted = {
        "name": "test-hosted",
        "kind": "openai",
        "source": "openai",
        "provider_model": "dall-e-3",
    }
    settings = Settings(data_dir=data_dir, cost={"usd_per_gpu_hour": 36.0}, models=[hosted])
    db = Database(settings.db_path)
    # A past run measured 1.5 s per image on tiny-sdxl: at $36/GPU-hour that is $0.015.
    Ledger(db).record(
        LedgerRow(
            request_id="past",
            model="tiny-sdxl",
            provider="local",
            cached=False,
            seeds=[1, 2],
            cost_usd=0.0,
            gpu_seconds=3.0,
        )
    )
    db.close()
    src = write_jsonl(
        tmp_path / "rows.jsonl",
        [
            {"prompt": "a", "seed": 1, "steps": 1},
            {"prompt": "b", "n": 2, "steps": 1},
            {"prompt": "c", "model": "test-hosted", "size": "1024x1024"},
            {"prompt": "d", "model": "test-hosted", "size": "1024x1024", "n": 2},
            {"prompt": "e", "colour": "red"},
            {"prompt": "f", "model": "no-such-model"},
        ],
    )
    out = tmp_path / "out"
    code = batch_cmd.run(settings, file=src, out=out, dry_run=True)
    assert code == batch_cmd.EXIT_INVALID
    printed = capsys.readouterr().out

    service = ImageService(settings)
    try:
        prepared = service.prepare(
            ImageRequest(prompt="c", model="test-hosted", width=1024, height=1024, n=3)
        )
        per_request = prepared.backend.estimate_cost_usd(prepared.params)
        assert service.ledger.rows() and len(service.ledger.rows()) == 1  # nothing ran
    finally:
        service.close()
    assert not out.exists()
    assert "line 5: unknown field 'colour'" in printed
    assert "line 6: model 'no-such-model' is not in the catalogue" in printed
    assert "local $0.045000" in printed  # 3 images x 1.5 s x $36/h
    if per_request is None:
        assert "2 rows unpriced" in printed
    else:
        assert f"openai ${per_request:.6f}" in printed


def test_options_are_checked_before_anything_runs(settings: Settings, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "a"}])
    with pytest.raises(errors.InvalidRequestError, match="--concurrency"):
        batch_cmd.run(settings, file=src, out=tmp_path / "o", concurrency=0)
    with pytest.raises(errors.InvalidRequestError, match="--budget-usd"):
        batch_cmd.run(settings, file=src, out=tmp_path / "o", budget_usd=-1)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(BatchError, match="holds no requests"):
        batch_cmd.run(settings, file=tmp_path / "empty.jsonl", out=tmp_path / "o")
    assert not (tmp_path / "o").exists()
