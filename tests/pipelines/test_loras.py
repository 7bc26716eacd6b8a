"""LoRA adapters on the real tiny pipelines, with the tiny LoRAs of models.local.tiny_loras:
weight 0 is no LoRA, a LoRA (diffusers or kohya format) changes the pixels, several apply at
once, a plain batch after a LoRA batch is a fresh runner's to the byte, a LoRA that does not fit
is refused naming the file and leaves the pipeline clean, adapters past max_loaded_loras are
unloaded least recently used first, and requests with other adapters never share a call."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from models.base import GenerationParams, InvalidParamsError, LoraRef
from models.catalogue import Catalogue
from models.local import tiny_loras
from models.local.backend import DiffusersBackend
from models.local.loras import LoraLibrary
from models.local.pipeline import PipelineRunner, RuntimeOptions
from models.local.worker import DeviceWorker, WorkItem, batch_key

SIZE = {"tiny-sdxl": 32, "tiny-flux": 32}


@pytest.fixture(scope="session")
def tiny_loras_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-loras")
    tiny_loras.build_tiny_loras(folder)
    return folder


@pytest.fixture
def lora_dir(data_dir: Path, tiny_loras_dir: Path) -> Path:
    """The tiny LoRAs in the data directory's default library (DATA_DIR/loras)."""
    target = data_dir / "loras"
    shutil.copytree(tiny_loras_dir, target)
    return target


class Rig:
    """One runner over the tiny LoRA library, and the requests the tests send it."""

    def __init__(self, data_dir: Path, model: str, *, max_loaded: int = 8) -> None:
        spec = Catalogue.load([]).get(model)
        assert spec is not None
        self.model = model
        self.runner = PipelineRunner(
            spec, data_dir=data_dir, options=RuntimeOptions(max_loaded_loras=max_loaded)
        )
        self.library = LoraLibrary(data_dir / "loras")

    def ref(self, name: str, weight: float = 1.0) -> LoraRef:
        """What the service resolves a request's LoRA name to."""
        return LoraRef(name=name, weight=weight, sha256=self.library.find(name).sha256)

    def params(self, *loras: LoraRef, seed: int = 3) -> GenerationParams:
        return GenerationParams(
            prompt="a lighthouse at dusk",
            model=self.model,
            width=SIZE[self.model],
            height=SIZE[self.model],
            n=1,
            seed=seed,
            steps=2,
            guidance_scale=3.5,
            scheduler=self.runner.family.default_scheduler,
            loras=loras,
        )

    def png(self, *loras: LoraRef) -> bytes:
        return self.runner.run_batch([self.params(*loras)]).images[0][0].data

    def pixels(self, *loras: LoraRef) -> np.ndarray:
        image = self.runner.run_batch([self.params(*loras)]).images[0][0]
        return np.asarray(image.pixels, dtype=np.int16)

    def adapters_on_pipeline(self) -> set[str]:
        adapters = self.runner.pipe.get_list_adapters()
        return {name for names in adapters.values() for name in names}


def mean_change(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


@pytest.mark.parametrize(
    ("model", "lora"), [("tiny-sdxl", "tiny-sdxl-a"), ("tiny-flux", "tiny-flux-a")]
)
def test_weight_zero_is_no_lora(data_dir: Path, lora_dir: Path, model: str, lora: str) -> None:
    rig = Rig(data_dir, model)
    plain = rig.png()
    assert rig.png(rig.ref(lora, 0.0)) == plain
    assert rig.png(rig.ref(lora, 1.0)) != plain


@pytest.mark.parametrize(
    ("model", "lora"),
    [("tiny-sdxl", "tiny-sdxl-a"), ("tiny-sdxl", "tiny-sdxl-kohya"), ("tiny-flux", "tiny-flux-a")],
)
def test_a_lora_changes_the_pixels(data_dir: Path, lora_dir: Path, model: str, lora: str) -> None:
    """The kohya file too: diffusers converts its lora_unet_/lora_te1_/lora_te2_ names."""
    rig = Rig(data_dir, model)
    plain = rig.pixels()
    changed = rig.pixels(rig.ref(lora))
    assert mean_change(plain, changed) > 2.0  # of 255: a visible change, not rounding
    # And the weight scales it: half the weight, a change between none and the whole.
    half = mean_change(plain, rig.pixels(rig.ref(lora, 0.5)))
    assert 0 < half < mean_change(plain, changed)


@pytest.mark.parametrize(
    ("model", "first", "second"),
    [("tiny-sdxl", "tiny-sdxl-a", "tiny-sdxl-b"), ("tiny-flux", "tiny-flux-a", "tiny-flux-b")],
)
def test_two_loras_in_one_request(
    data_dir: Path, lora_dir: Path, model: str, first: str, second: str
) -> None:
    rig = Rig(data_dir, model)
    a, b = rig.ref(first), rig.ref(second, 0.7)
    both = rig.png(a, b)
    assert both not in {rig.png(), rig.png(a), rig.png(b)}
    assert len(rig.adapters_on_pipeline()) == 2
    assert rig.png(a, b) == both  # switching back to the pair reproduces it


@pytest.mark.parametrize(
    ("model", "lora"), [("tiny-sdxl", "tiny-sdxl-kohya"), ("tiny-flux", "tiny-flux-a")]
)
def test_a_plain_batch_after_a_lora_batch_is_a_fresh_runners(
    data_dir: Path, lora_dir: Path, model: str, lora: str
) -> None:
    used = Rig(data_dir, model)
    with_lora = used.png(used.ref(lora))
    after = used.png()
    fresh = Rig(data_dir, model).png()
    assert after == fresh
    assert with_lora != fresh
    # And the LoRA, switched on again (loaded still), gives what it gave.
    assert used.png(used.ref(lora)) == with_lora


def test_a_lora_of_another_family_is_refused_naming_the_file(
    data_dir: Path, lora_dir: Path
) -> None:
    rig = Rig(data_dir, "tiny-sdxl")
    with pytest.raises(InvalidParamsError) as info:
        rig.png(rig.ref(tiny_loras.SD15_LORA))
    assert info.value.param == "loras"
    assert info.value.message.startswith(
        "lora 'sd15-kohya' (sd15-kohya.safetensors) is a sd15 LoRA; model 'tiny-sdxl' is sdxl"
    )
    flux = Rig(data_dir, "tiny-flux")
    with pytest.raises(InvalidParamsError, match="is a sdxl LoRA; model 'tiny-flux' is flux"):
        flux.png(flux.ref("tiny-sdxl-a"))


def test_a_lora_that_fails_to_load_leaves_the_pipeline_clean(
    data_dir: Path, lora_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An SDXL LoRA for the full-size base passes the family check and fails in diffusers (its
    layers are 2048 wide, tiny-sdxl's 64): a 400 naming the file, diffusers' text in the log
    only, no adapter left behind, and the next requests exactly a fresh runner's."""
    rig = Rig(data_dir, "tiny-sdxl")
    a = rig.ref("tiny-sdxl-a")
    with_a = rig.png(a)
    with pytest.raises(InvalidParamsError) as info:
        rig.png(a, rig.ref(tiny_loras.SDXL_BASE_LORA))
    message = info.value.message
    assert info.value.param == "loras"
    assert message.startswith(
        "lora 'sdxl-base-shaped' (sdxl-base-shaped.safetensors) does not fit model 'tiny-sdxl'"
    )
    assert "size mismatch" not in message and "size mismatch" in caplog.text
    assert rig.runner.adapters.loaded == ["tiny-sdxl-a"]
    assert len(rig.adapters_on_pipeline()) == 1
    fresh = Rig(data_dir, "tiny-sdxl")
    assert rig.png() == fresh.png()
    assert rig.png(a) == with_a


def test_a_file_changed_after_resolution_is_refused(data_dir: Path, lora_dir: Path) -> None:
    rig = Rig(data_dir, "tiny-sdxl")
    stale = rig.ref("tiny-sdxl-a")
    with_a = rig.png(stale)
    shutil.copy(lora_dir / "tiny-sdxl-b.safetensors", lora_dir / "tiny-sdxl-a.safetensors")
    with pytest.raises(InvalidParamsError, match=r"changed on disk .* send the request again"):
        rig.png(stale)
    # Resolved again, the new file is a new adapter (the old one's pixels do not come back).
    replaced = rig.png(rig.ref("tiny-sdxl-a"))
    assert replaced != with_a
    assert replaced == Rig(data_dir, "tiny-sdxl").png(rig.ref("tiny-sdxl-b"))


def test_adapters_past_the_limit_are_unloaded_least_recently_used_first(
    data_dir: Path, lora_dir: Path
) -> None:
    rig = Rig(data_dir, "tiny-sdxl", max_loaded=2)
    a, b, c = (rig.ref(name) for name in tiny_loras.SDXL_LORAS)
    with_a = rig.png(a)
    rig.png(b)
    rig.png(a)  # a is now the most recently used
    rig.png(c)
    assert rig.runner.adapters.loaded == ["tiny-sdxl-a", "tiny-sdxl-c"]
    assert len(rig.adapters_on_pipeline()) == 2
    rig.png(b)  # loaded again, in place of a
    assert rig.runner.adapters.loaded == ["tiny-sdxl-c", "tiny-sdxl-b"]
    assert rig.png(a) == with_a  # reloaded, the same pixels
    with pytest.raises(InvalidParamsError, match=r"at most 2 loaded \(local.max_loaded_loras\)"):
        rig.png(a, b, c)


def test_the_backend_refuses_a_misfit_before_the_queue(data_dir: Path, lora_dir: Path) -> None:
    worker = DeviceWorker()
    spec = Catalogue.load([]).get("tiny-sdxl")
    assert spec is not None
    backend = DiffusersBackend(spec, data_dir=data_dir, worker=worker, options=RuntimeOptions())
    rig = Rig(data_dir, "tiny-sdxl")
    fits = rig.params(rig.ref("tiny-sdxl-a"))
    assert backend.unsupported(fits) is None
    assert backend.resolve(fits).loras == fits.loras
    for name, needle in [
        (tiny_loras.SD15_LORA, "is a sd15 LoRA"),
        ("no-such-lora", "not in the LoRA library"),
    ]:
        sha = "0" * 64 if name == "no-such-lora" else rig.ref(name).sha256
        with pytest.raises(InvalidParamsError, match=needle):
            backend.resolve(rig.params(LoraRef(name=name, weight=1.0, sha256=sha)))
    assert not backend.loaded and worker.pipeline_calls == 0


def test_requests_with_other_adapters_never_share_a_call(data_dir: Path, lora_dir: Path) -> None:
    rig = Rig(data_dir, "tiny-sdxl")
    a = rig.ref("tiny-sdxl-a")
    variants = [
        rig.params(seed=1),
        rig.params(a, seed=1),
        rig.params(rig.ref("tiny-sdxl-a", 0.5), seed=1),
    ]
    assert len({batch_key(p) for p in variants}) == 3
    solo = [rig.runner.run_batch([p]).images[0][0].data for p in variants]
    worker = DeviceWorker(batch_window_s=0.5)
    try:
        release = threading.Event()
        worker.call(release.wait)
        items = [worker.submit(WorkItem(params=p, runner=rig.runner)) for p in variants]
        release.set()
        together = [item.future.result(timeout=120).images[0].data for item in items]
    finally:
        worker.stop()
    assert worker.pipeline_calls == 3
    assert together == solo
    # The same adapter set does share one.
    same = dataclasses.replace(variants[1], seed=2)
    assert batch_key(same) == batch_key(variants[1])


def test_the_tiny_loras_build_the_same_bytes_each_time(
    tmp_path: Path, tiny_loras_dir: Path
) -> None:
    again = tiny_loras.build_tiny_loras(tmp_path)
    assert sorted(again) == sorted(tiny_loras.TINY_LORAS)
    for name, path in again.items():
        assert path.read_bytes() == (tiny_loras_dir / path.name).read_bytes(), name
    families = {f.name: f.family for f in LoraLibrary(tmp_path).list()}
    assert families == {
        **dict.fromkeys(tiny_loras.SDXL_LORAS, "sdxl"),
        tiny_loras.KOHYA_SDXL_LORA: "sdxl",
        **dict.fromkeys(tiny_loras.FLUX_LORAS, "flux"),
        tiny_loras.SD15_LORA: "sd15",
        tiny_loras.SDXL_BASE_LORA: "sdxl",
    }


def test_the_lora_modules_import_without_torch() -> None:
    code = (
        "import sys\n"
        "import models.local.loras, models.local.adapters, models.local.tiny_loras\n"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
