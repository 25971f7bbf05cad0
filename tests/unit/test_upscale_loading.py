"""Safe loading of upscale model files (``upscale/loading.py``): real file round trips and refusals."""
import os

import pytest
import torch
from safetensors.torch import save_file

from atelier.tests.fixtures.tiny_swinir import tiny_swinir, tiny_swinir_state_dict
from atelier.upscale.loading import UpscaleModelError, is_swinir, load_upscale_model, read_state_dict


@pytest.fixture(scope="module")
def sd():
    return tiny_swinir_state_dict(scale=4, upsampler="nearest+conv")


def same_output(a, b):
    x = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    return torch.equal(a(x), b(x))


@pytest.mark.parametrize("wrap", ["plain", "params_ema", "module_prefix"])
def test_pth_round_trip(tmp_path, sd, wrap):
    """Official SwinIR releases are {"params_ema": state_dict}; some dumps carry a DataParallel prefix."""
    obj = {"plain": sd, "params_ema": {"params_ema": sd}, "module_prefix": {"module." + k: v for k, v in sd.items()}}[wrap]
    path = tmp_path / "003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN.pth"
    torch.save(obj, path)
    model = load_upscale_model(str(path))
    assert is_swinir(model) and model.scale == 4
    assert same_output(model, tiny_swinir(scale=4, upsampler="nearest+conv"))


def test_safetensors_round_trip(tmp_path, sd):
    path = tmp_path / "swinir.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model = load_upscale_model(str(path))
    assert is_swinir(model) and same_output(model, tiny_swinir(scale=4, upsampler="nearest+conv"))


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {Payload.marker}",))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path, sd):
    Payload.marker = tmp_path / "EXECUTED"
    path = tmp_path / "evil.pth"
    torch.save({**sd, "x": Payload()}, path)
    with pytest.raises(UpscaleModelError, match="refused: it is a pickle that contains more than weights"):
        load_upscale_model(str(path))
    assert not Payload.marker.exists()


@pytest.mark.parametrize("content, suffix", [(b"\x93NUMPY garbage" * 50, ".pth"), (b"PK\x03\x04 truncated", ".pth"),
                                            (b"\xff" * 64, ".safetensors")])
def test_corrupt_files_are_clear_errors(tmp_path, content, suffix):
    path = tmp_path / ("broken" + suffix)
    path.write_bytes(content)
    with pytest.raises(UpscaleModelError, match="corrupt"):
        read_state_dict(str(path))


def test_missing_file_names_the_folder(tmp_path):
    with pytest.raises(UpscaleModelError, match="models/upscale_models"):
        load_upscale_model(str(tmp_path / "nope.pth"))


def test_non_image_model_is_refused(tmp_path):
    lora = {"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 8),
            "lora_unet_down_blocks_0.alpha": torch.tensor(4.0)}
    path = tmp_path / "artist_lora.safetensors"
    save_file(lora, str(path))
    with pytest.raises(UpscaleModelError, match="not an image model spandrel knows"):
        load_upscale_model(str(path))


def test_file_without_tensors_is_refused(tmp_path):
    path = tmp_path / "empty.pth"
    torch.save({"epoch": 3, "note": "no weights"}, path)
    with pytest.raises(UpscaleModelError, match="no tensors"):
        read_state_dict(str(path))
