"""decode_image: every image mode becomes RGB 128x128 uint8; bad files give one clear error naming them."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from skinclf.data.images import decode_image
from skinclf.errors import SkinclfError

COLOUR = (200, 60, 30)


def _solid(mode: str, size: tuple[int, int]) -> Image.Image:
    return Image.new("RGB", size, COLOUR).convert(mode)


@pytest.mark.parametrize(
    ("mode", "suffix", "size"),
    [
        ("RGB", ".jpg", (300, 200)),
        ("RGB", ".png", (128, 128)),
        ("RGBA", ".png", (64, 90)),
        ("L", ".png", (150, 150)),
        ("P", ".png", (129, 77)),
        ("CMYK", ".jpg", (200, 256)),
        ("RGB", ".bmp", (40, 40)),
    ],
)
def test_every_mode_becomes_rgb_128(tmp_path, mode, suffix, size):
    path = tmp_path / f"img{suffix}"
    img = _solid(mode, size)
    img.save(path)
    out = decode_image(path)
    assert out.dtype == torch.uint8 and out.shape == (3, 128, 128)
    # The decoded colour is what the file shows once converted to RGB (JPEG: within its loss).
    expected = np.asarray(img.convert("RGB"), dtype=np.float64).mean(axis=(0, 1))
    got = out.double().mean(dim=(1, 2)).numpy()
    assert np.abs(got - expected).max() < 6, (got, expected)


def test_palette_with_transparency_and_custom_size(tmp_path):
    path = tmp_path / "p.png"
    img = _solid("P", (50, 50))
    img.info["transparency"] = 0
    img.save(path, transparency=0)
    out = decode_image(path, size=32)
    assert out.shape == (3, 32, 32)


def test_alpha_is_dropped_and_the_colours_under_it_kept(tmp_path):
    """Not composited onto a background: an image whose lesion mask is stored as alpha keeps the
    whole photo, even where the mask is 0 (README: a cut-out must be flattened by the user)."""
    rgb = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    alpha = np.zeros((128, 128, 1), dtype=np.uint8)
    alpha[32:96, 32:96] = 255  # opaque lesion, transparent skin around it
    Image.fromarray(np.concatenate([rgb, alpha], axis=2), mode="RGBA").save(tmp_path / "masked.png")
    assert torch.equal(decode_image(tmp_path / "masked.png"), torch.from_numpy(rgb).permute(2, 0, 1))


@pytest.mark.parametrize("suffix", [".gif", ".tif"])
def test_of_an_animation_or_a_multi_page_file_the_first_frame_is_read(tmp_path, suffix):
    path = tmp_path / f"frames{suffix}"
    first, second = _solid("RGB", (128, 128)), Image.new("RGB", (128, 128), (10, 200, 90))
    first.save(path, save_all=True, append_images=[second])
    frames = []
    with Image.open(path) as img:
        for index in range(2):
            img.seek(index)
            frames.append(torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1))
    assert torch.equal(decode_image(path), frames[0]) and not torch.equal(frames[0], frames[1])


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "gray16.png"
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (64, 1))
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode in {"I;16", "I"}
    out = decode_image(path)
    row = out[0, 64].numpy().astype(int)
    # Grey (R = G = B), full 0..255 range, monotone: not white from clipping at 255.
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    assert row[0] <= 2 and row[-1] >= 253
    assert abs(int(out[0, :, 64].float().mean()) - 128) <= 3
    assert (np.diff(row) >= 0).all()


def test_16_bit_grayscale_scale_does_not_depend_on_the_pixels(tmp_path):
    # 200 and 300 of 65535 are both near black, and the brighter source must not come out darker.
    decoded = []
    for value in (200, 300, 65535):
        path = tmp_path / f"gray{value}.png"
        Image.fromarray(np.full((16, 16), value, np.uint16)).save(path)
        decoded.append(int(decode_image(path, size=16)[0, 8, 8]))
    assert decoded == [round(200 * 255 / 65535), round(300 * 255 / 65535), 255]


def test_float_tiff_is_read_on_the_0_to_1_scale(tmp_path):
    # A float image in 0..1 (scikit-image's convention) was read as 0..255 and came out black.
    path = tmp_path / "float.tif"
    Image.fromarray(np.tile(np.linspace(0, 1, 128, dtype=np.float32), (128, 1))).save(path)
    assert Image.open(path).mode == "F"
    row = decode_image(path)[0, 64].numpy().astype(int)
    assert row[0] == 0 and row[-1] == 255 and abs(row[64] - 129) <= 1 and (np.diff(row) >= 0).all()


@pytest.mark.parametrize(("low", "high"), [(0.0, 200.0), (-0.5, 1.0), (0.0, float("nan"))])
def test_float_tiff_outside_0_to_1_is_refused_naming_it(tmp_path, low, high):
    path = tmp_path / "counts.tif"
    pixels = np.full((16, 16), 0.5, np.float32)
    pixels[0, 0], pixels[-1, -1] = low, high
    Image.fromarray(pixels).save(path)
    with pytest.raises(SkinclfError, match=rf"{path}: a floating-point image .* expected values from 0"):
        decode_image(path)


def test_exif_rotation_is_applied(tmp_path):
    # Stored: left half red, right half blue. Orientation 6 = rotate 90 degrees clockwise to
    # display, so the displayed image is red on top and blue at the bottom.
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:, :30] = (255, 0, 0)
    arr[:, 30:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    out = decode_image(path).float()
    top, bottom = out[:, :50].mean(dim=(1, 2)), out[:, -50:].mean(dim=(1, 2))
    assert top[0] > 200 and top[2] < 50, top
    assert bottom[2] > 200 and bottom[0] < 50, bottom


def test_damaged_exif_is_one_error_naming_the_file(tmp_path):
    # An orientation tag beside a text value where EXIF's ImageWidth must be a number: PIL's
    # parser fails with struct.error, so the orientation the photo needs is unknown.
    img = Image.new("RGB", (30, 40))
    exif = img.getexif()
    exif[0x0112] = 6
    exif[0x010F] = "Cam"
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", exif=exif.tobytes())
    data = bytearray(buffer.getvalue())
    data[data.find(b"Exif") + 17] = 0  # the maker tag's id becomes 256, ImageWidth
    path = tmp_path / "damaged_exif.jpg"
    path.write_bytes(data)
    with pytest.raises(SkinclfError) as err:
        decode_image(path)
    assert str(err.value).startswith(f"{path}: damaged EXIF metadata (")
    assert str(err.value).endswith("(re-save the image without EXIF to use it)")


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # pytest shows what skinclf silences
@pytest.mark.parametrize("kept", [7, 12])  # bytes of the directory's entries kept: part of one, one
def test_exif_cut_short_is_an_error_not_an_upright_image(tmp_path, kept):
    # PIL reads the entries that fit, warns without naming the file, and returns the image
    # unturned: the orientation tag past the cut is lost.
    img = Image.new("RGB", (30, 40))
    exif = img.getexif()
    exif[0x010F] = "Cam"
    exif[0x0112] = 6
    block = exif.tobytes()  # "Exif\0\0", TIFF header (8 bytes), entry count (2), 12 bytes an entry
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", exif=block)
    data = buffer.getvalue()
    start = data.find(b"Exif")
    app1_size = int.from_bytes(data[start - 2 : start], "big")
    cut_block = block[: 6 + 8 + 2 + kept]  # the first entry, whole or not, of two
    cut = data[: start - 2] + (len(cut_block) + 2).to_bytes(2, "big") + cut_block
    cut += data[start - 2 + app1_size :]
    path = tmp_path / "cut_exif.jpg"
    path.write_bytes(cut)
    with pytest.raises(SkinclfError) as err:
        decode_image(path)
    assert str(err.value).startswith(f"{path}: damaged EXIF metadata (its first directory is cut short")


def test_an_exif_header_without_a_directory_is_no_damage(tmp_path):
    # Nothing was cut: there is no orientation tag to lose.
    buffer = io.BytesIO()
    Image.new("RGB", (30, 40), (200, 20, 20)).save(
        buffer, "JPEG", exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00"
    )
    (tmp_path / "bare_exif.jpg").write_bytes(buffer.getvalue())
    assert decode_image(tmp_path / "bare_exif.jpg")[0].float().mean() > 150


def test_a_jpeg_padded_with_zeros_after_a_cut_names_the_file(tmp_path):
    # What an interrupted download into a preallocated file leaves: PIL decodes it without an
    # error, the top of the picture over flat grey.
    full = tmp_path / "full.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (150, 150, 3), dtype=np.uint8)).save(full)
    data = full.read_bytes()
    padded = tmp_path / "padded.jpg"
    padded.write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))
    with pytest.raises(SkinclfError) as err:
        decode_image(padded)
    assert str(err.value).startswith(f"{padded}: corrupt or truncated image (its JPEG data ends before")
    # Bytes after the end marker are no cut: padding, or a phone's motion-photo video, whose bytes
    # hold marker-like pairs (a start-of-scan FF DA with no end marker after it here).
    for name, trailer in [("padding", bytes(64)), ("video", b"ftypmp42\x00\xff\xda\x00\x01" + bytes(99))]:
        (tmp_path / f"{name}.jpg").write_bytes(data + trailer)
        assert decode_image(tmp_path / f"{name}.jpg").shape == (3, 128, 128)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    for limit in (6000, 1000):  # just over PIL's limit (our check), and over twice it (PIL's own error)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(SkinclfError, match="decompression bomb") as err:
            decode_image(path)
        assert str(path) in str(err.value)


def test_truncated_jpeg_names_the_file(tmp_path):
    full = tmp_path / "full.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(full)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(SkinclfError, match="corrupt or truncated") as err:
        decode_image(cut)
    assert str(cut) in str(err.value)


def test_an_empty_file_is_named_empty(tmp_path):
    (tmp_path / "upload.jpg").write_bytes(b"")
    with pytest.raises(SkinclfError) as err:
        decode_image(tmp_path / "upload.jpg")
    assert str(err.value) == f"{tmp_path / 'upload.jpg'}: an empty file (0 bytes); expected an image"


def test_non_image_and_missing_files_name_the_path(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(SkinclfError, match="not an image") as err:
        decode_image(text)
    assert str(text) in str(err.value)
    with pytest.raises(SkinclfError, match="no such image file"):
        decode_image(tmp_path / "absent.png")


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_the_whole_image_is_resized_nothing_cropped(tmp_path, suffix):
    # 300x100 grey with a green band in its first and a red band in its last 10 columns: both
    # edges survive the squeeze to 128x128 (a centre crop or a kept aspect ratio would lose them).
    pixels = np.full((100, 300, 3), 128, np.uint8)
    pixels[:, :10] = (0, 200, 0)
    pixels[:, -10:] = (200, 0, 0)
    Image.fromarray(pixels).save(tmp_path / f"wide{suffix}", quality=95)
    image = decode_image(tmp_path / f"wide{suffix}").int()
    assert image.shape == (3, 128, 128)
    left, right, middle = image[:, :, :2], image[:, :, -2:], image[:, :, 60:68]
    assert (left[1] > 150).all() and (left[0] < 60).all()  # green all the way down the left edge
    assert (right[0] > 150).all() and (right[1] < 60).all()  # red down the right edge
    assert ((middle - 128).abs() < 12).all()  # the grey between them
