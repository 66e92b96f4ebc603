"""The one image reader: the same photo stored in many ways gives the same pixels and embeddings
in the scorer, MS-Diffusion and DreamBooth; an unreadable file is a UserError naming it."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from relationbench.errors import UserError
from relationbench.images import BACKGROUND, read_image, to_rgb

from .score_runs import make_run, photo

H, W = 48, 72  # wider than high: a missed rotation changes the shape
ORIENTATION = 0x0112


# -- the photo and its variants -------------------------------------------------------------------------
@pytest.fixture(params=["synthetic", "dreambench"])
def upright(request) -> np.ndarray:
    """The photo every variant stores, (H, W, 3) uint8: a real DreamBench photo where the shared
    data is beside the checkout, and a synthetic one always."""
    if request.param == "dreambench":
        image = Image.open(request.getfixturevalue("shared_dreambench") / "dog" / "00.jpg").convert("RGB")
    else:
        image = photo(3, 96)
    return np.asarray(image.resize((W, H), Image.Resampling.BICUBIC))


def grey_of(rgb: np.ndarray) -> np.ndarray:
    """The 8-bit grey copy a person would save: (H, W, 3) with equal channels."""
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    return np.repeat(grey[..., None], 3, axis=-1)


def composite(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Straight alpha over BACKGROUND, in floats: c * a + B * (1 - a), rounded."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.rint(colour.astype(np.float64) * a + BACKGROUND * (1.0 - a)).astype(np.uint8)


def ramp_alpha() -> np.ndarray:
    """(H, W) alpha from 0 (left) to 255 (right), with a fully transparent band."""
    alpha = np.broadcast_to(np.linspace(0, 255, W).round().astype(np.uint8), (H, W)).copy()
    alpha[: H // 4] = 0
    return alpha


def png16(samples: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit colour): (H, W, C) uint16, C = 1 or 3."""
    h, w, c = samples.shape
    raw = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2}[c], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def stored(upright: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores with EXIF `orientation` so that a viewer shows `upright`
    (the inverse of the viewer's transform; 6 means 'rotate 90 degrees clockwise to view')."""
    return {
        1: lambda a: a,
        2: np.fliplr,
        3: lambda a: np.rot90(a, 2),
        4: np.flipud,
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, 1),  # anticlockwise here, clockwise on display
        7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
        8: lambda a: np.rot90(a, -1),
    }[orientation](upright)


def save(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def with_orientation(pixels: np.ndarray, orientation: int, fmt: str, **options) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return save(Image.fromarray(np.ascontiguousarray(pixels)), fmt, exif=exif, **options)


def quantized(rgb: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    """A 32-colour palette image of the photo and its colours by palette lookup, (H, W, 3)."""
    pal_image = Image.fromarray(rgb).quantize(32)
    palette = np.asarray(pal_image.getpalette(), dtype=np.uint8).reshape(-1, 3)
    return pal_image, palette[np.asarray(pal_image)]


def lossless_variants(up: np.ndarray) -> dict[str, tuple[bytes, str, np.ndarray]]:
    """name -> (file bytes, PIL mode the file opens in, the pixels read_image must return)."""
    grey = grey_of(up)
    g8, g16 = grey[..., 0], grey[..., 0].astype(np.uint16) * 257
    alpha = ramp_alpha()
    pal_image, pal_rgb = quantized(up)
    hole = int(np.asarray(pal_image)[0, 0])  # this palette index is made transparent
    pal_trns = np.where((np.asarray(pal_image) == hole)[..., None], np.uint8(BACKGROUND), pal_rgb)
    key = int(g16[0, 0])  # this 16-bit grey value is made transparent
    grey_trns = np.where((g16 == key)[..., None], np.uint8(BACKGROUND), grey)
    bits = g8 > 128
    cmyk = np.concatenate([255 - up, (np.arange(H * W, dtype=np.uint32).reshape(H, W, 1) * 7 % 256)], axis=-1)
    cmyk = cmyk.astype(np.uint8)
    nk = 255 - cmyk[..., 3:].astype(np.float64)
    cmyk_rgb = np.rint((255 - cmyk[..., :3]) * nk / 255).astype(np.uint8)  # naive CMYK, no ICC profile
    out = {
        "rgb-png": (save(Image.fromarray(up), "PNG"), "RGB", up),
        "grey8-png": (save(Image.fromarray(g8), "PNG"), "L", grey),
        "grey16-png": (save(Image.fromarray(g16), "PNG"), "I;16", grey),
        "grey16-big-endian-tiff": (save(Image.fromarray(g16.astype(">u2")), "TIFF"), "I;16B", grey),
        "grey16-pgm": (b"P5\n%d %d\n65535\n" % (W, H) + g16.astype(">u2").tobytes(), "I", grey),
        "grey-float-tiff": (save(Image.fromarray(g8.astype(np.float32) / 255), "TIFF"), "F", grey),
        "grey16-trns-png": (save(Image.fromarray(g16), "PNG", transparency=key), "I;16", grey_trns),
        "rgb16-png": (png16(up.astype(np.uint16) * 257), "RGB", up),
        "rgba-opaque-png": (save(Image.fromarray(np.dstack([up, np.full((H, W), 255, np.uint8)])), "PNG"),
                            "RGBA", up),
        "rgba-png": (save(Image.fromarray(np.dstack([up, alpha])), "PNG"), "RGBA", composite(up, alpha)),
        "la-png": (save(Image.fromarray(np.dstack([g8, alpha]), "LA"), "PNG"), "LA", composite(grey, alpha)),
        "palette-png": (save(pal_image, "PNG"), "P", pal_rgb),
        "palette-trns-png": (save(pal_image, "PNG", transparency=hole), "P", pal_trns),
        "bilevel-png": (save(Image.fromarray(bits), "PNG"), "1", np.repeat(np.where(bits, 255, 0)[..., None], 3,
                                                                          -1).astype(np.uint8)),
        "cmyk-tiff": (save(Image.fromarray(cmyk, "CMYK"), "TIFF"), "CMYK", cmyk_rgb),
        "webp-lossless": (save(Image.fromarray(up), "WEBP", lossless=True), "RGB", up),
    }
    for o in range(2, 9):
        out[f"exif{o}-png"] = (with_orientation(stored(up, o), o, "PNG"), "RGB", up)
    return out


LOSSLESS = list(lossless_variants(np.zeros((H, W, 3), np.uint8)))
JPEG_QUALITY = 95
JPEG_MAE = 4.0  # grey levels: mean |read - photo| allowed for a JPEG of the photo (quality 95, 4:4:4)


def jpeg_variants(up: np.ndarray) -> dict[str, bytes]:
    """The photo as JPEGs: plain RGB (the yardstick), Adobe CMYK, sideways with EXIF orientation 6."""
    return {
        "rgb-jpeg": save(Image.fromarray(up), "JPEG", quality=JPEG_QUALITY, subsampling=0),
        "cmyk-jpeg": save(Image.fromarray(up).convert("CMYK"), "JPEG", quality=JPEG_QUALITY),
        "exif6-jpeg": with_orientation(stored(up, 6), 6, "JPEG", quality=JPEG_QUALITY, subsampling=0),
    }


def write_all(folder: Path, files: dict[str, bytes]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, data in files.items():
        paths[name] = folder / f"{name}.img"
        paths[name].write_bytes(data)
    return paths


def pixels(path: Path) -> np.ndarray:
    image = read_image(path)
    assert image.mode == "RGB"
    return np.asarray(image)


# -- pixels ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_variants_give_the_exact_pixels(upright, tmp_path, name):
    data, mode, expected = lossless_variants(upright)[name]
    path = tmp_path / name
    path.write_bytes(data)
    with Image.open(path) as raw:
        assert raw.mode == mode  # the file exercises the conversion it is named for
    np.testing.assert_array_equal(pixels(path), expected)


def test_grey_variants_are_equal_and_not_white(upright, tmp_path):
    variants = lossless_variants(upright)
    paths = write_all(tmp_path, {k: variants[k][0] for k in
                                 ("grey8-png", "grey16-png", "grey16-big-endian-tiff", "grey16-pgm",
                                  "grey-float-tiff")})
    grey8 = pixels(paths.pop("grey8-png"))
    assert grey8.std() > 10  # a photo, not a constant (PIL's own convert gives all white for 16 bits)
    for path in paths.values():
        np.testing.assert_array_equal(pixels(path), grey8)


def test_jpeg_variants_are_the_photo_within_jpeg_error(upright, tmp_path):
    paths = write_all(tmp_path, jpeg_variants(upright))
    with Image.open(paths["cmyk-jpeg"]) as raw:
        assert raw.mode == "CMYK" and "adobe" in raw.info  # stored inverted, as Adobe writes CMYK
    with Image.open(paths["exif6-jpeg"]) as raw:
        assert raw.size == (H, W)  # stored sideways
    errors = {}
    for name, path in paths.items():
        got = pixels(path)
        assert got.shape == upright.shape, name
        errors[name] = np.abs(got.astype(np.int16) - upright).mean()
    assert max(errors.values()) <= JPEG_MAE, errors
    # a missed rotation or CMYK inversion is far outside that error
    assert np.abs(np.rot90(pixels(paths["rgb-jpeg"]), 2).astype(np.int16) - upright).mean() > 4 * JPEG_MAE


def test_rgba_premultiplied_in_memory():
    """Premultiplied RGBa (TIFFs with associated alpha) already holds c * a: only B * (1 - a) is added."""
    up = np.asarray(photo(5, 32))
    alpha = np.broadcast_to(np.arange(32, dtype=np.uint8)[None] * 8, (32, 32))
    premultiplied = np.rint(up * (alpha[..., None] / 255.0)).astype(np.uint8)
    image = Image.frombytes("RGBa", (32, 32), np.dstack([premultiplied, alpha]).tobytes())
    expected = np.minimum(premultiplied.astype(np.int32) + (255 - alpha[..., None]), 255)
    np.testing.assert_array_equal(np.asarray(to_rgb(image)), expected)
    # within rounding of the straight composite of the same picture
    assert np.abs(np.asarray(to_rgb(image)).astype(np.int16) - composite(up, alpha)).max() <= 1


def test_out_of_range_high_depth_images_are_refused(tmp_path):
    floats = tmp_path / "hdr.tiff"
    Image.fromarray(np.full((4, 4), 3.5, np.float32)).save(floats)
    with pytest.raises(UserError, match="outside 0..1") as err:
        read_image(floats)
    assert err.value.path == str(floats)
    with pytest.raises(UserError, match="outside 0..65535"):
        to_rgb(Image.fromarray(np.full((4, 4), 70000, np.int32)), name="x")


# -- embeddings -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoders():
    from relationbench.backbones import get_backbone
    from relationbench.metrics.encoders import load_clip, load_dino
    from relationbench.score import _Encoders

    tiny = get_backbone("tiny")
    return _Encoders(load_clip(tiny), load_dino(tiny), "fp32")


@pytest.fixture
def variant_files(tmp_path) -> tuple[np.ndarray, dict[str, Path]]:
    up = np.asarray(photo(3, 96).resize((W, H), Image.Resampling.BICUBIC))
    files = {k: v[0] for k, v in lossless_variants(up).items()}
    return up, write_all(tmp_path / "variants", {**files, **jpeg_variants(up)})


def test_scorer_embeddings_of_every_variant(encoders, variant_files, tmp_path, one_thread):
    """The scorer's reference path (_Encoders._embed_files: bytes, reader, preprocessing, CLIP and
    DINO, cache) and its generated-image path (_ImageFiles) give each variant the embedding of the
    pixels it stands for."""
    from relationbench.metrics.preprocess import CLIP_PREPROCESS, DINO_PREPROCESS
    from relationbench.score import _ImageFiles

    up, paths = variant_files
    expected = lossless_variants(up)
    truth = write_all(tmp_path / "truth", {k: save(Image.fromarray(v[2]), "PNG") for k, v in expected.items()})
    names = list(paths)
    clip, dino = encoders._embed_files([paths[n] for n in names], tmp_path / "cache")
    clip_t, dino_t = encoders._embed_files([truth.get(n, truth["rgb-png"]) for n in names], tmp_path / "cache")
    for n, name in enumerate(names):
        if name in expected:
            np.testing.assert_allclose(clip[n], clip_t[n], atol=1e-6, err_msg=name)
            np.testing.assert_allclose(dino[n], dino_t[n], atol=1e-6, err_msg=name)
        else:  # JPEG: cosine 0.99998 to the upright photo here; the photo sideways gives 0.995 / 0.998
            assert clip[n] @ clip_t[n] > 0.9995 and dino[n] @ dino_t[n] > 0.9995, name
    grey8, grey16 = names.index("grey8-png"), names.index("grey16-png")
    np.testing.assert_array_equal(clip[grey16], clip[grey8])
    assert not np.allclose(clip[grey8], clip[names.index("rgb-png")], atol=1e-3)  # embeddings see the change

    dataset = _ImageFiles([paths["grey16-png"], paths["rgba-png"]], [set(), set()])
    grey_item, rgba_item = dataset[0], dataset[1]
    assert grey_item["error"] is None and rgba_item["error"] is None
    grey_pixels = Image.fromarray(expected["grey16-png"][2])
    np.testing.assert_array_equal(grey_item["clip"], CLIP_PREPROCESS(grey_pixels))
    np.testing.assert_array_equal(rgba_item["dino"], DINO_PREPROCESS(Image.fromarray(expected["rgba-png"][2])))


def test_msdiffusion_reference_embeddings(variant_files, tmp_path, one_thread):
    from relationbench.backbones import get_backbone
    from relationbench.methods import Context
    from relationbench.methods.msdiffusion import MSDiffusionMethod, MSDiffusionSettings

    _, paths = variant_files
    method = MSDiffusionMethod(MSDiffusionSettings(steps=1), Context(get_backbone("tiny"), "cpu", torch.float32,
                                                                   tmp_path))
    colour = ["rgb-png", "rgb16-png", "rgba-opaque-png", "exif6-png", "exif5-png"]
    grey = ["grey8-png", "grey16-png", "grey16-pgm"]
    method.encode_references([str(paths[n]) for n in colour + grey])
    embeds = {n: method._embeds[str(paths[n])] for n in colour + grey}
    for group in (colour, grey):
        for name in group[1:]:
            torch.testing.assert_close(embeds[name], embeds[group[0]], atol=1e-6, rtol=0, msg=name)
    assert not torch.allclose(embeds["grey8-png"], embeds["rgb-png"], atol=1e-3)


def test_dreambooth_training_pixels(variant_files):
    from relationbench.methods.dreambooth import training

    _, paths = variant_files
    for group in (["rgb-png", "rgb16-png", "rgba-opaque-png", "exif6-png", "exif8-png"],
                  ["grey8-png", "grey16-png", "grey16-big-endian-tiff"]):
        first, size = training._pixels(paths[group[0]], 40)
        assert size == (H, W)
        for name in group[1:]:
            x, size = training._pixels(paths[name], 40)
            assert size == (H, W), name  # the original (h, w) after the EXIF rotation
            torch.testing.assert_close(x, first, atol=0, rtol=0, msg=name)


def test_clip_i_of_a_16_bit_grey_reference(tmp_path, monkeypatch):
    """The issue's numbers: a subject whose only reference is a 16-bit grey PNG scores the CLIP-I
    and DINO of its 8-bit copy (it scored as an all-white picture)."""
    import pandas as pd

    from relationbench.cli import cli
    from relationbench.suites import load_suite

    monkeypatch.setenv("RELBENCH_CACHE", str(tmp_path / "cache"))
    grey = np.asarray(photo(11, 80).convert("L"))
    subject = load_suite("relationbench").case("rb-s-001").subjects[0]
    scores = {}
    for name, image in (("8", Image.fromarray(grey)), ("16", Image.fromarray(grey.astype(np.uint16) * 257)),
                        ("white", Image.fromarray(np.full_like(grey, 255)))):
        data = tmp_path / f"data{name}"
        (data / subject.source / subject.dir).mkdir(parents=True)
        image.save(data / subject.source / subject.dir / "00.png")
        run = make_run(tmp_path / f"results{name}", "alpha@tiny", ["rb-s-001"], per_case=2, seed=1)
        monkeypatch.setenv("RELBENCH_DATA", str(data))
        res = CliRunner().invoke(cli, ["score", "--quiet", "--bootstrap", "10", str(run)])
        assert res.exit_code == 0, res.output
        scores[name] = pd.read_csv(run / "scores.csv").sort_values("index")[["clip_i", "dino"]].to_numpy()
    np.testing.assert_allclose(scores["16"], scores["8"], atol=1e-6)
    assert np.abs(scores["16"] - scores["white"]).min() > 1e-3  # the old reading is far off


# -- unreadable files -----------------------------------------------------------------------------------
PNG, JPEG = save(photo(2, 64), "PNG"), save(photo(2, 64), "JPEG")


BAD: dict[str, tuple[Callable[[Path], Path], str]] = {
    "random bytes": (lambda d: _write(d / "x.png", np.random.default_rng(0).bytes(300)), "not an image"),
    "empty": (lambda d: _write(d / "x.png", b""), "empty"),
    "half a png": (lambda d: _write(d / "x.png", PNG[: len(PNG) // 2]), "truncated"),
    "png without its end": (lambda d: _write(d / "x.png", PNG[:-12]), "truncated"),  # pixels whole, IEND gone
    "half a jpeg": (lambda d: _write(d / "x.jpg", JPEG[: len(JPEG) // 2]), "truncated"),
    "eps": (lambda d: _write(d / "x.png", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"), "not an image"),
    "a directory": (lambda d: d, "cannot read"),
    "missing": (lambda d: d / "nothing.png", "cannot read"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", list(BAD))
def test_unreadable_files_name_the_path(tmp_path, case):
    from relationbench.data import _undecodable

    make, words = BAD[case]
    path = make(tmp_path)
    with pytest.raises(UserError, match=words) as err:
        read_image(path)
    assert err.value.path == str(path) and err.value.hint
    assert str(path) in str(err.value)
    if path.is_file():  # bytes read elsewhere are named by the caller
        with pytest.raises(UserError) as err:
            read_image(path.read_bytes(), name="named.png")
        assert err.value.path == "named.png"
        assert _undecodable(path) == err.value.message  # data import refuses what the reader refuses
