"""Batch runs on the real tiny pipeline: input parsing with line numbers (strict JSON, lax CSV),
one bad row failing alone, CSV input, cache-served repeats, near-duplicate flags, the budget cap
(its arithmetic in tests/test_batch_budget.py), dry-run cost projection, resuming after a torn
manifest line, and errors worded for the CLI."""

from __future__ import annotations

import asyncio
import hashlib
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
from server.ledger import Ledger, LedgerRow
from server.quality import hamming
from server.registry import BackendRegistry
from server.service import ImageRequest, ImageService
from server.settings import Settings
from server.store.sql import open_database


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def ledger_rows(settings: Settings, tag: str) -> list[dict[str, Any]]:
    db = open_database(None, path=settings.db_path)
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
    assert (rows[1].line, (rows[1].error or "").startswith("unknown field 'colour'")) == (3, True)
    assert "did you mean 'steps'" in (rows[2].error or "")


@pytest.mark.parametrize(
    ("fields", "param", "needle"),
    [
        ({"prompt": "a", "n": "two"}, "n", 'n should be a valid integer, got "two"'),
        # JSON is strict: a number in a string, or a boolean, is not an integer.
        ({"prompt": "a", "seed": "16"}, "seed", "seed should be a valid integer"),
        ({"prompt": "a", "seed": True}, "seed", "seed should be a valid integer"),
        ({"prompt": "a", "size": "64"}, "size", "size must be WIDTHxHEIGHT"),
        ({"prompt": "a", "guidance_scale": "nan"}, "guidance_scale", "should be a valid number"),
        ({"prompt": "a", "output_format": "gif"}, "output_format", "'png', 'jpeg' or 'webp'"),
        ({"prompt": "a", "local_only": "yes"}, "local_only", "should be a valid boolean"),
        ({"prompt": 7}, "prompt", "prompt should be a valid string"),
        ({"seed": 1}, "prompt", "prompt is missing"),
        ({"prompt": "a", "width": 64}, "width", 'size "WIDTHxHEIGHT"'),
        ({"prompt": "\ud800"}, "prompt", "lone surrogate (U+D800)"),
        ({"prompt": "a", "negative_prompt": "b\udfff"}, "negative_prompt", "lone surrogate"),
        # An unknown field is named first: it explains the errors after it.
        ({"prompt": 7, "colour": "red"}, "colour", "unknown field 'colour'"),
    ],
)
def test_field_errors_name_the_field(fields: dict[str, Any], param: str, needle: str) -> None:
    (row,) = rows_from_objects([fields])
    assert row.request is None
    assert row.param == param
    assert needle in (row.error or "")
    # Row errors reach the manifest and HTTP clients: always encodable, never a CLI flag.
    (row.error or "").encode("utf-8")
    assert "--" not in (row.error or "")


def test_a_response_field_is_refused_without_cli_advice() -> None:
    (row,) = rows_from_objects([{"prompt": "a", "response_format": "url"}])
    assert row.param == "response_format"
    assert "drop the field" in (row.error or "") and "--out" not in (row.error or "")
    (key,) = rows_from_objects([{"prompt": "a", "\udc80": 1}])
    assert key.param is None
    assert key.error == 'every field name must be text UTF-8 can encode, got "\\udc80"'


def test_local_only_is_a_row_field() -> None:
    rows = rows_from_objects([{"prompt": "a", "local_only": True}, {"prompt": "b"}])
    assert [r.request.local_only if r.request else None for r in rows] == [True, False]


def test_csv_rows_coerce_types_and_apply_defaults() -> None:
    text = (
        "prompt,seed,size,steps,guidance_scale,model,local_only\n"
        '"a fox, running",7,64x32,2,4.5,,true\n'
        "\n"
        "a cat,,,,,tiny-flux,false\n"
        "a dog,x,,,,,\n"
        "a bat, 8 ,,,,,maybe\n"
    )
    rows = parse_csv(text, BatchDefaults(model="tiny-sdxl", preset="photo"))
    assert [r.line for r in rows] == [2, 4, 5, 6]
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
        local_only=True,
    )
    assert rows[1].request is not None and rows[1].request.model == "tiny-flux"
    assert rows[1].request.seed is None and rows[1].request.local_only is False
    assert rows[2].request is None and rows[2].param == "seed"
    assert rows[3].request is None and rows[3].param == "local_only"


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
    # The oracle: every earlier hash within 4 bits, by brute force.
    pairs = [
        (i, j) for j in range(len(hashes)) for i in range(j) if hamming(hashes[i], hashes[j]) <= 4
    ]
    for i, j in pairs:
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
        assert len(entry.sha256) == len(entry.images)
        for name, digest in zip(entry.images, entry.sha256, strict=True):
            assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in out.glob("*.png")) == sorted(
        name for e in manifest.values() for name in e.images
    )
    assert manifest[1].provider == "local" and manifest[1].cost_usd > 0
    assert manifest[1].quality[0]["ok"] is True


def test_a_lone_surrogate_fails_its_row_and_the_others_run(
    settings: Settings, tmp_path: Path
) -> None:
    src = tmp_path / "rows.jsonl"
    src.write_text('{"prompt": "\\ud800"}\n{"prompt": "a kite", "seed": 3, "steps": 1}\n')
    out = tmp_path / "out"
    assert batch_cmd.run(settings, file=src, out=out) == batch_cmd.EXIT_ROWS_FAILED
    manifest = read_manifest(out / MANIFEST_NAME)
    assert (manifest[1].status, manifest[1].param) == ("failed", "prompt")
    assert "lone surrogate" in (manifest[1].error or "")
    assert manifest[2].status == "done"


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


def test_concurrent_rows_never_overshoot_a_priced_budget_and_skipped_rows_run_on_resume(
    data_dir: Path, tmp_path: Path
) -> None:
    """The cap end to end (its arithmetic is unit-tested in tests/test_batch_budget.py)."""
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
            assert service.spent(summary.batch_id) == pytest.approx(0.05)
            assert (summary.done, summary.skipped_budget, summary.cached) == (6, 15, 1)
            manifest = read_manifest(out / MANIFEST_NAME)
            done = [r for r, e in sorted(manifest.items()) if e.status == "done"]
            assert done == [1, 2, 3, 4, 5, 21]
            assert manifest[21].cached and manifest[21].cost_usd == 0.0
            assert all(manifest[r].reserved_usd == pytest.approx(0.01) for r in range(1, 6))
            skipped = [e for e in manifest.values() if e.status == "skipped_budget"]
            assert all(e.reserved_usd == pytest.approx(0.01) and not e.images for e in skipped)

            # Resumed with room to spare, only the skipped rows run, and the cap counts what
            # the first run spent: 0.05 + 15 x 0.01 = 0.20.
            with BatchFolder.open(out, fingerprint=rows_fingerprint(rows), resume=True) as f:
                again = await run_batch(
                    service, rows, f, options=BatchOptions(concurrency=8, budget_usd=0.205)
                )
            assert (again.done, again.skipped_budget, again.resumed) == (21, 0, 6)
            assert service.spent(summary.batch_id) == pytest.approx(0.20)
        finally:
            await service.aclose()
        assert generated_per_seed(settings, summary.batch_id) == Counter(range(20))

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
    db = open_database(None, path=settings.db_path)
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
        per_request = prepared.estimate.usd
    finally:
        service.close()
    db = open_database(None, path=settings.db_path)
    try:
        assert len(Ledger(db).rows()) == 1  # nothing ran
    finally:
        db.close()
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
    with pytest.raises(errors.InvalidRequestError, match="--concurrency must be at least 1"):
        batch_cmd.run(settings, file=src, out=tmp_path / "o", concurrency=0)
    with pytest.raises(errors.InvalidRequestError, match="--budget-usd must be a non-negative"):
        batch_cmd.run(settings, file=src, out=tmp_path / "o", budget_usd=-1)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(BatchError, match=r"FILE '.*empty\.jsonl' holds no requests"):
        batch_cmd.run(settings, file=tmp_path / "empty.jsonl", out=tmp_path / "o")
    with pytest.raises(BatchError, match=r"FILE '.*missing\.jsonl' does not exist") as missing:
        batch_cmd.run(settings, file=tmp_path / "missing.jsonl", out=tmp_path / "o")
    assert missing.value.param == "file"
    assert not (tmp_path / "o").exists()


def test_batch_errors_name_options_as_fields_unless_the_cli_words_them() -> None:
    """The batch names its options neutrally (the HTTP API's fields); the CLI edge spells them
    as flags."""
    with pytest.raises(BatchError) as raised:
        BatchOptions(budget_usd=-1)
    error = raised.value
    assert error.param == "budget_usd"
    assert error.message == "budget_usd must be a non-negative amount, got -1"
    cli = error.spelled(batch_cmd.cli_names(Path("rows.jsonl")))
    assert cli.message == "--budget-usd must be a non-negative amount, got -1"
    assert (type(cli), cli.param, cli.code) == (BatchError, "budget_usd", "invalid_request")


def test_edit_rows_run_from_files_beside_the_batch_and_record_their_inputs(
    settings: Settings, tmp_path: Path
) -> None:
    """An img2img row (image path relative to the batch file), an inpaint row (image and mask),
    a plain row, and a row whose path leaves the folder: the bad row fails alone, naming
    `image`; the manifest records each edit's input hashes."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    src = write_jsonl(
        tmp_path / "rows.jsonl",
        [
            {"prompt": "a red door", "image": "in.png", "strength": 0.5, "seed": 1, "steps": 2},
            {"prompt": "a red door", "image": "in.png", "mask": "mask.png", "seed": 1, "steps": 2},
            {"prompt": "a red door", "seed": 1, "steps": 2},
            {"prompt": "a red door", "image": "../in.png", "seed": 1, "steps": 2},
        ],
    )
    out = tmp_path / "out"
    assert batch_cmd.run(settings, file=src, out=out) == batch_cmd.EXIT_ROWS_FAILED
    manifest = read_manifest(out / MANIFEST_NAME)
    assert [manifest[i].status for i in (1, 2, 3, 4)] == ["done", "done", "done", "failed"]
    assert manifest[4].param == "image"
    img2img, inpaint, plain = (manifest[i].params for i in (1, 2, 3))
    assert img2img["inputs"]["task"] == "img2img" and img2img["inputs"]["strength"] == 0.5
    assert inpaint["inputs"]["task"] == "inpaint" and inpaint["inputs"]["mask"]
    assert img2img["inputs"]["images"] == inpaint["inputs"]["images"]
    assert "inputs" not in plain
    original = np.asarray(Image.open(tmp_path / "in.png").convert("RGB"))
    painted = np.asarray(Image.open(out / manifest[2].images[0]).convert("RGB"))
    keep = np.asarray(mask) == 0
    assert (original[keep] == painted[keep]).all()
