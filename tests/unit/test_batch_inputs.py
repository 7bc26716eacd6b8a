"""Batch rows with image inputs: `image`/`mask` cells as paths relative to the batch file
(never outside its folder unless absolute paths are allowed) or as base64; `loras` as JSON
text in CSV; the fingerprint of rows with bytes."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from server.batch import BatchDefaults, read_rows, rows_fingerprint, rows_from_objects
from server.request import LoraRequest
from tests.helpers_images import gradient, png, white_mask

IMAGE = png(gradient(32, 32))
MASK = white_mask(32, 32, (8, 8, 24, 24))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "batch" / "in").mkdir(parents=True)
    (tmp_path / "batch" / "in" / "cat.png").write_bytes(IMAGE)
    (tmp_path / "batch" / "mask.png").write_bytes(MASK)
    (tmp_path / "outside.png").write_bytes(IMAGE)
    return tmp_path / "batch"


def one(folder: Path, line: str, **defaults: object) -> tuple[object, str | None, str | None]:
    path = folder / "rows.jsonl"
    path.write_text(line + "\n")
    rows = read_rows(path, BatchDefaults(**defaults))  # type: ignore[arg-type]
    return rows[0].request, rows[0].error, rows[0].param


def test_paths_relative_to_the_batch_file(folder: Path) -> None:
    request, error, _ = one(folder, '{"prompt": "p", "image": "in/cat.png", "mask": "mask.png"}')
    assert error is None and request is not None
    assert request.images == (IMAGE,) and request.mask == MASK  # type: ignore[attr-defined]
    assert request.mask_convention == "white"  # type: ignore[attr-defined]
    request, _, _ = one(folder, '{"prompt": "p", "image": ["in/cat.png", "in/cat.png"]}')
    assert len(request.images) == 2  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("cell", "words"),
    [
        ("../outside.png", "outside the batch file's folder"),
        ("in/../../outside.png", "outside the batch file's folder"),
        ("{abs}", "absolute path"),
        ("in/missing.png", "cannot read"),
    ],
)
def test_paths_never_leave_the_folder(folder: Path, cell: str, words: str) -> None:
    text = cell.format(abs=folder.parent / "outside.png")
    request, error, param = one(folder, f'{{"prompt": "p", "image": "{text}"}}')
    assert request is None and param == "image" and error is not None and words in error


def test_a_symlink_out_of_the_folder_is_refused(folder: Path) -> None:
    os.symlink(folder.parent / "outside.png", folder / "link.png")
    _, error, param = one(folder, '{"prompt": "p", "mask": "link.png", "image": "in/cat.png"}')
    assert param == "mask" and error is not None and "outside" in error


def test_absolute_paths_when_allowed(folder: Path) -> None:
    outside = folder.parent / "outside.png"
    line = f'{{"prompt": "p", "image": "{outside}"}}'
    request, error, _ = one(folder, line, allow_absolute_paths=True)
    assert error is None and request.images == (IMAGE,)  # type: ignore[attr-defined]
    request, error, _ = one(
        folder, '{"prompt": "p", "image": "../outside.png"}', allow_absolute_paths=True
    )
    assert error is None


def test_base64_cells(folder: Path) -> None:
    raw = base64.b64encode(IMAGE).decode()
    request, error, _ = one(folder, f'{{"prompt": "p", "image": "{raw}"}}')
    assert error is None and request.images == (IMAGE,)  # type: ignore[attr-defined]
    url = "data:image/png;base64," + raw
    request, error, _ = one(folder, f'{{"prompt": "p", "image": "{url}"}}')
    assert error is None and request.images == (IMAGE,)  # type: ignore[attr-defined]
    _, error, param = one(folder, '{"prompt": "p", "image": "data:image/png,notbase64"}')
    assert param == "image" and error is not None and "base64" in error


def test_rows_over_http_take_base64_only() -> None:
    raw = base64.b64encode(IMAGE).decode()
    good, path = rows_from_objects(
        [{"prompt": "p", "image": raw}, {"prompt": "p", "image": "in/cat.png"}]
    )
    assert good.request is not None and good.request.images == (IMAGE,)
    assert path.request is None and path.param == "image"
    assert path.error is not None and "imagegen batch" in path.error


def test_csv_cells_edit_fields_and_loras(folder: Path) -> None:
    path = folder / "rows.csv"
    path.write_text(
        "prompt,image,mask,strength,mask_blur,inpaint_area,resize_mode,loras\n"
        'p,in/cat.png,mask.png,0.6,4,masked,pad,"[{""name"": ""ink"", ""weight"": 0.5}]"\n'
        "q,in/cat.png,,,,,,not json\n"
    )
    good, bad = read_rows(path)
    request = good.request
    assert request is not None and good.error is None
    assert (request.strength, request.mask_blur, request.inpaint_area) == (0.6, 4, "masked")
    assert request.resize_mode == "pad" and request.loras == (LoraRequest("ink", 0.5),)
    assert bad.request is None and bad.param == "loras" and "JSON text" in (bad.error or "")


def test_fingerprint_covers_the_input_bytes(folder: Path) -> None:
    rows = rows_from_objects([{"prompt": "p", "image": base64.b64encode(IMAGE).decode()}])
    other = rows_from_objects(
        [{"prompt": "p", "image": base64.b64encode(png(gradient(32, 16))).decode()}]
    )
    plain = rows_from_objects([{"prompt": "p"}])
    assert len({rows_fingerprint(rows), rows_fingerprint(other), rows_fingerprint(plain)}) == 3
