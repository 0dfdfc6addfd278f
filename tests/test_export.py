"""`python -m rgt.export` to ONNX on the tiny config: ONNX Runtime (CPU) against PyTorch in fp32 and fp16, the
fixed-size contract, metadata, and `rgt.upscale --onnx` against the PyTorch tile loop."""

import copy
import json
import re

import pytest
import torch
from _utils import TINY, deterministic_fill, gen

import rgt
from rgt.data import read_image, write_image
from rgt.export import export_onnx, main, verify_onnx
from rgt.inference.onnx_tiles import OnnxTiles
from rgt.upscale import main as upscale_main

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed: pip install 'rgt[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install 'rgt[onnx]'")

# fp32 ORT vs PyTorch (outputs in [0.27, 0.58]): measured max abs error 7.5e-7 .. 1.6e-6 on the inputs below
# (Xeon, AVX-512, ORT 1.32, torch 2.13); the issue asks for <= 1e-4.
FP32_ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    """Tiny x2 RGT on the default kernels ("auto": the C++ recursive_dwconv on CPU when rgt._C is built), which
    the export must route around to plain ops. The spec's deterministic weights make attention peaked and the
    shift masks matter (without them a 1% change of L-SA's q.k scale moves the output by 2e-7, with them 4e-3;
    dropping the shift moves it by 3e-2), so a wrong mask or bias in the graph cannot hide under the tolerance."""
    model = rgt.RGT(**TINY).eval()
    deterministic_fill(model)
    return model


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory):
    return rgt.save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny_x2.pth")


def ort_run(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["output"], {"input": x.numpy()})[0])


def torch_run(model, x: torch.Tensor, clamp: bool) -> torch.Tensor:
    """The PyTorch model (a copy on the reference ops) in x's dtype."""
    m = copy.deepcopy(model).to(x.dtype)
    m.set_kernels("reference")
    with torch.no_grad():
        y = m(x)
    return y.clamp(0, 1) if clamp else y


@pytest.fixture(scope="module")
def padded_dynamic(model, tmp_path_factory):
    """40 x 52 (L-SA pads to 64 x 64; group 1 block 0 is a shifted block), dynamic batch, unclamped."""
    path = tmp_path_factory.mktemp("onnx") / "pad_dyn.onnx"
    return path, export_onnx(model, path, (40, 52), batch=0, clamp=False)


def test_fp32_padded_dynamic_batch_matches_pytorch(model, padded_dynamic):
    path, proto = padded_dynamic
    onnx.checker.check_model(str(path), full_check=True)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}  # no rgt:: or other custom ops
    assert [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == ["batch", 3, 40, 52]
    assert model.kernels == "auto"  # the caller's model is not changed by the export
    for n in (1, 3):
        x = torch.rand(n, 3, 40, 52, generator=gen(f"export-pad-{n}"))
        y = ort_run(path, x)
        assert y.shape == (n, 3, 80, 104)
        torch.testing.assert_close(y, torch_run(model, x, clamp=False), atol=FP32_ATOL, rtol=0)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["architecture"] == "RGT" and meta["scale"] == "2" and json.loads(meta["tile_size"]) == [40, 52]
    assert meta["batch"] == "dynamic" and meta["dtype"] == "float32" and meta["output_clamped"] == "false"
    config = json.loads(meta["config"])
    assert rgt.RGT(**config).state_dict().keys() == model.state_dict().keys()  # the stored config rebuilds it


def test_size_is_fixed_in_the_graph(padded_dynamic):
    with pytest.raises(Exception, match="dimensions"):  # ORT checks the declared shape
        ort_run(padded_dynamic[0], torch.rand(1, 3, 48, 52))


@pytest.fixture(scope="module")
def unpadded(ckpt, tmp_path_factory):
    """32 x 64 (multiples of 32: no padding), batch 1, clamped, through the command line with --verify."""
    path = tmp_path_factory.mktemp("onnx") / "x2_32x64.onnx"
    assert main(["-m", str(ckpt), "-o", str(path), "--size", "32", "64", "--verify"]) == 0
    return path


def test_cli_fp32_unpadded_clamped_matches_pytorch(model, unpadded):
    x = torch.rand(1, 3, 32, 64, generator=gen("export-unpadded"))
    torch.testing.assert_close(ort_run(unpadded, x), torch_run(model, x, clamp=True), atol=FP32_ATOL, rtol=0)
    report = verify_onnx(unpadded, model)
    assert report["ok"] and report["max_err"] <= FP32_ATOL, report


def test_fp16_within_pytorch_fp16_error(model, tmp_path):
    """ORT on the fp16 file and PyTorch run in fp16, both against PyTorch in float64 on the same fp16-rounded
    input; STYLE.md: the fp16 error may be at most 2x PyTorch fp16's own. Measured over 4 inputs: ORT CPU
    7.4e-4 .. 2.9e-3, PyTorch fp16 (CPU) 8.9e-4 .. 1.8e-3, ratio 0.75 .. 1.61 (1.0 on this test's input)."""
    path = tmp_path / "fp16.onnx"
    proto = export_onnx(model, path, (40, 52), fp16=True, clamp=False)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    x = torch.rand(1, 3, 40, 52, generator=gen("export-fp16")).half()
    truth = torch_run(model, x.double(), clamp=False)
    y = ort_run(path, x)
    assert y.dtype == torch.float16 and y.shape == (1, 3, 80, 104)
    ort_err = (y.double() - truth).abs().max().item()
    torch_err = (torch_run(model, x, clamp=False).double() - truth).abs().max().item()
    assert 0 < ort_err <= 2 * torch_err, (ort_err, torch_err)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--size", "12", "40"], "--size 12 40: both sides must be >= 16 px"),
        (["--size", "16", "1100"], "too elongated for RG-SA.*smallest valid size containing it is 64 1100"),
        (["--size", "32", "32", "--batch", "-1"], "--batch must be >= 1 .fixed. or 0 .dynamic."),
        (["--size", "32", "32", "--opset", "12"], "--opset 12: the torchscript exporter writes opsets 13 to 20"),
        (["--size", "32", "32", "--exporter", "dynamo", "--opset", "17"], "dynamo exporter writes opsets 18 to"),
    ],
)
def test_cli_refuses_what_it_cannot_export_as_asked(ckpt, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["-m", str(ckpt), "-o", str(tmp_path / "x.onnx"), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("python -m rgt.export: error:") and re.search(message, err), err
    assert not (tmp_path / "x.onnx").exists()


def test_custom_op_in_the_graph_is_refused(model, tmp_path, monkeypatch):
    """kernels="auto" on a CPU tensor runs rgt._C's recursive_dwconv, which ONNX cannot hold: a clear error."""
    from rgt.ops import _ext

    if _ext.load_error() is not None:
        pytest.skip(f"rgt._C is not built, so no custom op reaches the graph: {_ext.load_error()}")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # keep the attention on the reference: only the C++ op is fused
    with pytest.raises(ValueError, match="kernels='auto'.*rgt::recursive_dwconv.*kernels='reference'"):
        export_onnx(model, tmp_path / "x.onnx", (32, 32), kernels="auto")
    assert not (tmp_path / "x.onnx").exists()


def test_onnx_tiles_match_the_pytorch_tile_loop(model, unpadded):
    """Tiles of the exported 32 x 64 with the sin^2 blend equal `tiled_forward` on the PyTorch model; an image
    smaller than the tile is reflect-padded to it and cropped back."""
    from rgt.inference.tiling import reflect_pad, tiled_forward

    tiles = OnnxTiles(unpadded)
    assert (tiles.tile, tiles.upscale, tiles.batch, tiles.overlap) == ((32, 64), 2, 1, 8)  # 32 >= 32/2: 32/4
    x = torch.rand(2, 3, 56, 100, generator=gen("onnx-tiles"))
    expected = tiled_forward(lambda t: torch_run(model, t, clamp=True), x, 2, (32, 64), 8)
    torch.testing.assert_close(tiles(x), expected, atol=FP32_ATOL, rtol=0)
    small = torch.rand(1, 3, 20, 24, generator=gen("onnx-tiles-small"))
    expected = torch_run(model, reflect_pad(small, 12, 40), clamp=True)[..., :40, :48]
    torch.testing.assert_close(tiles(small), expected, atol=FP32_ATOL, rtol=0)


def test_upscale_cli_with_onnx(model, unpadded, tmp_path, capsys):
    """`rgt.upscale --onnx` writes the tile loop's result; gray and alpha go through the Upscaler as usual."""
    from rgt.inference.tiling import tiled_forward

    src = tmp_path / "in"
    write_image(src / "rgb.png", torch.rand(3, 40, 72, generator=gen("onnx-cli-rgb")))
    write_image(src / "gray.png", torch.rand(1, 40, 72, generator=gen("onnx-cli-gray")),
                alpha=torch.rand(1, 40, 72, generator=gen("onnx-cli-alpha")))
    out = tmp_path / "out"
    assert upscale_main(["-i", str(src), "-o", str(out), "--onnx", str(unpadded)]) == 0
    lr = read_image(src / "rgb.png").image  # 8-bit
    expected = tiled_forward(lambda t: torch_run(model, t, clamp=True), lr[None], 2, (32, 64), 8)[0]
    got = read_image(out / "rgb.png").image
    torch.testing.assert_close(got, torch.round(expected * 255) / 255, atol=1.01 / 255, rtol=0)  # rounding ties
    assert (got * 255 - torch.round(expected * 255)).abs().gt(0.5).float().mean() < 1e-3
    gray = read_image(out / "gray.png")
    assert gray.image.shape == (1, 80, 144) and gray.alpha is not None

    for argv, message in [
        (["--onnx", str(unpadded), "--tile", "64"], "--tile cannot be used with --onnx"),
        (["--onnx", str(tmp_path / "missing.onnx")], "no such file"),
        (["--onnx", str(src / "rgb.png")], "cannot be loaded"),
        (["--onnx", str(unpadded), "-m", "x.pth"], "not allowed with argument"),
        (["--onnx", str(unpadded), "-s", "4"], "is a x2 model, but --scale 4 was asked for"),
    ]:
        with pytest.raises(SystemExit) as e:
            upscale_main(["-i", str(src), "-o", str(out), "--overwrite", *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_onnx_tiles_fill_a_fixed_batch(model, tmp_path):
    """A file exported for batch 2 runs a batch of 3 as 2 + (1 + a repeated filler), which is dropped."""
    path = tmp_path / "b2.onnx"
    export_onnx(model, path, (32, 32), batch=2)
    x = torch.rand(3, 3, 32, 32, generator=gen("onnx-batch2"))
    torch.testing.assert_close(OnnxTiles(path)(x), torch_run(model, x, clamp=True), atol=FP32_ATOL, rtol=0)


@pytest.mark.slow
def test_dynamo_exporter_dynamic_batch(model, tmp_path):
    """The torch.export-based exporter (about 3x slower to export than TorchScript here): same contract."""
    pytest.importorskip("onnxscript", reason="--exporter dynamo needs onnxscript")
    path = tmp_path / "dynamo.onnx"
    proto = export_onnx(model, path, (40, 52), batch=0, clamp=False, exporter="dynamo")
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [18]
    for n in (1, 3):
        x = torch.rand(n, 3, 40, 52, generator=gen(f"export-dynamo-{n}"))
        torch.testing.assert_close(ort_run(path, x), torch_run(model, x, clamp=False), atol=FP32_ATOL, rtol=0)
