"""The LoRA library, torch-free: files written as real safetensors headers (8-byte length, JSON,
zeroed data), found by name; pickles, escaping names and unknown names refused with the fix;
the family read from tensor names and widths; hashes remembered by (path, size, mtime)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest

from models.base import InvalidParamsError
from models.local.loras import LoraLibrary, detect_family, detect_format, read_tensor_shapes


def write_safetensors(path: Path, shapes: dict[str, list[int]], fill: int = 0) -> Path:
    """A valid safetensors file: float32 tensors of `shapes`, every byte `fill`."""
    header: dict[str, object] = {"__metadata__": {"by": "test"}}
    offset = 0
    for key, shape in shapes.items():
        size = 4
        for dim in shape:
            size *= dim
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes([fill]) * offset)
    return path


ATTN2 = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
SDXL_PEFT = {
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": [4, 64],
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": [64, 4],
}
SD15_KOHYA = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": [
        4,
        768,
    ],
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": [
        320,
        4,
    ],
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": [4, 768],
}


@pytest.fixture
def library(tmp_path: Path) -> LoraLibrary:
    root = tmp_path / "loras"
    root.mkdir()
    write_safetensors(root / "style.safetensors", SDXL_PEFT)
    write_safetensors(root / "old-style.safetensors", SD15_KOHYA)
    return LoraLibrary(root, memo_dir=tmp_path / "memo")


def test_find_describes_the_file(library: LoraLibrary) -> None:
    found = library.find("style")
    path = library.root / "style.safetensors"
    assert found.path == path
    assert found.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (found.family, found.format) == ("sdxl", "diffusers")
    assert found.size_bytes == path.stat().st_size
    # The file name is accepted for the name too.
    assert library.find("style.safetensors") == found


def test_list_gives_every_safetensors_file_by_name(library: LoraLibrary) -> None:
    (library.root / "notes.txt").write_text("not a LoRA")
    (library.root / "pickled.ckpt").write_bytes(b"\x80\x04")
    rows = library.list()
    assert [(r.name, r.family, r.format) for r in rows] == [
        ("old-style", "sd15", "kohya"),
        ("style", "sdxl", "diffusers"),
    ]


@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".bin", ".pth"])
def test_pickle_files_are_refused_with_the_reason(library: LoraLibrary, suffix: str) -> None:
    (library.root / f"legacy{suffix}").write_bytes(b"\x80\x04K\x00.")
    for name in ("legacy", f"legacy{suffix}"):
        with pytest.raises(InvalidParamsError, match="pickle") as info:
            library.find(name)
        assert info.value.param == "loras"
        assert f"legacy{suffix}" in info.value.message
        assert "runs code" in info.value.message and "safetensors" in info.value.message
    assert "legacy" not in [r.name for r in library.list()]


def test_a_safetensors_file_wins_over_a_pickle_of_the_same_name(library: LoraLibrary) -> None:
    (library.root / "style.ckpt").write_bytes(b"\x80\x04")
    assert library.find("style").format == "diffusers"


@pytest.mark.parametrize(
    "name", ["../style", "sub/style", "..\\style", "..", ".", "", "/etc/passwd", "a\0b"]
)
def test_names_never_leave_the_folder(library: LoraLibrary, name: str) -> None:
    outside = library.root.parent / "style.safetensors"
    write_safetensors(outside, SDXL_PEFT)
    with pytest.raises(InvalidParamsError, match=r"local\.lora_dir") as info:
        library.find(name)
    assert info.value.param == "loras"


def test_a_link_out_of_the_folder_is_refused(library: LoraLibrary, tmp_path: Path) -> None:
    outside = write_safetensors(tmp_path / "elsewhere.safetensors", SDXL_PEFT)
    (library.root / "linked.safetensors").symlink_to(outside)
    with pytest.raises(InvalidParamsError, match="outside the LoRA library"):
        library.find("linked")
    assert "linked" not in [r.name for r in library.list()]


def test_an_unknown_name_lists_what_the_library_has(library: LoraLibrary) -> None:
    with pytest.raises(InvalidParamsError) as info:
        library.find("missing")
    message = info.value.message
    assert "'missing' is not in the LoRA library" in message
    assert "old-style, style" in message and "imagegen loras" in message


def test_an_empty_library_says_where_files_go(tmp_path: Path) -> None:
    with pytest.raises(InvalidParamsError, match=r"empty: put missing.safetensors in local"):
        LoraLibrary(tmp_path / "nowhere").find("missing")
    assert LoraLibrary(tmp_path / "nowhere").list() == []


@pytest.mark.parametrize(
    "content",
    [b"", b"\x01\x00", struct.pack("<Q", 10**12) + b"{}", struct.pack("<Q", 4) + b"\xff\xfe[]"],
)
def test_a_damaged_file_is_named_and_left_out_of_the_list(
    library: LoraLibrary, content: bytes
) -> None:
    (library.root / "broken.safetensors").write_bytes(content)
    with pytest.raises(InvalidParamsError, match=r"'broken' \(broken.safetensors\) is not a"):
        library.find("broken")
    assert [r.name for r in library.list()] == ["old-style", "style"]


def test_the_header_is_read_without_the_tensors(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "x.safetensors", {"a.lora_A.weight": [4, 8]})
    assert read_tensor_shapes(path) == {"a.lora_A.weight": [4, 8]}


@pytest.mark.parametrize(
    ("keys", "family"),
    [
        # kohya / A1111
        ({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": [4, 640]}, "sdxl"),
        ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": [4, 768]}, "sdxl"),
        ({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": [4, 1280]}, "sdxl"),
        ({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": [4, 768]}, "sd15"),
        (SD15_KOHYA, "sd15"),
        ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": [16, 3072]}, "flux"),
        ({"lora_unet_single_blocks_0_linear1.lora_down.weight": [16, 3072]}, "flux"),
        ({"lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight": [4]}, "flux"),
        # diffusers / PEFT
        (SDXL_PEFT, "sdxl"),
        ({"text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": [4, 8]}, "sdxl"),
        ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": [4, 3072]}, "flux"),
        # The width tells SD1.5 from SDXL where the names are the same.
        ({f"unet.{ATTN2}.to_k.lora_A.weight": [4, 768]}, "sd15"),
        ({f"lora_unet_{ATTN2.replace('.', '_')}_to_v.lora_down.weight": [4, 2048]}, "sdxl"),
        ({"something.else": [4, 4]}, None),
    ],
)  # fmt: skip
def test_family_detection(keys: dict[str, list[int]], family: str | None) -> None:
    assert detect_family(keys) == family


def test_format_detection() -> None:
    assert detect_format(SD15_KOHYA) == "kohya"
    assert detect_format(SDXL_PEFT) == "diffusers"


def test_a_lora_of_another_family_names_the_file_and_the_mismatch(library: LoraLibrary) -> None:
    with pytest.raises(InvalidParamsError) as info:
        library.find("old-style").check_fits("tiny-sdxl", "sdxl")
    assert info.value.message.startswith(
        "lora 'old-style' (old-style.safetensors) is a sd15 LoRA; model 'tiny-sdxl' is sdxl"
    )
    library.find("style").check_fits("tiny-sdxl", "sdxl")  # fits: no error


def test_hashes_are_remembered_by_path_size_and_mtime(library: LoraLibrary) -> None:
    """Listing and every request find the hash known: a file rewritten in place with the same
    size and mtime keeps its remembered hash (the proof that it is not hashed again), in this
    library and in a new one over the same digest memo (a restart); a new mtime is a new file."""
    path = library.root / "style.safetensors"
    first = library.find("style").sha256
    stat = path.stat()
    write_safetensors(path, SDXL_PEFT, fill=1)  # same size, other bytes
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert library.find("style").sha256 == first
    assert [r.sha256 for r in library.list() if r.name == "style"] == [first]
    restarted = LoraLibrary(library.root, memo_dir=library.memo_dir)
    assert restarted.find("style").sha256 == first
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    fresh = hashlib.sha256(path.read_bytes()).hexdigest()
    assert fresh != first
    assert library.find("style").sha256 == fresh
