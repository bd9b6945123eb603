"""Images for the visual attacks: natural photos from installed packages, augmentation, text
rendering, and a content-addressed image cache.

Natural images are read by path from files that ship inside installed packages (scikit-image's
``skimage/data``, scikit-learn's ``sklearn/datasets/images``, matplotlib's ``sample_data``),
never through the packages' loader functions (some of scikit-image's download). Only photos
are catalogued: test patterns, logos and pictures of text are left out, since text inside an
"unrelated" image would confuse the typographic attacks.

Augmentation (a random crop, a horizontal flip, colour jitter) turns the ~19 photos into many
distinct images; its randomness comes from a ``random.Random`` seeded by the caller, so the
same key always gives the same pixels. Text is drawn with the DejaVu fonts matplotlib ships.

Every rendered image is encoded without metadata (PNG for typography, JPEG for photos) and
written once to ``$LIT_SAHS_CACHE/images/<sha256>.<png|jpg>`` (default ``~/.cache/lit_sahs``;
``$LIT_SAHS_IMAGE_CACHE`` names another directory), the name being the sha256 of the file's
bytes: identical renders (the same request under two attacks, or two runs) share one file. A small key index (``images/keys/``) maps what was rendered (attack,
text, photo, augmentation, versions) to that hash, so a re-run does not render again.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import PIL
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

from lit_sahs.errors import LitSahsError
from lit_sahs.io import atomic_write_bytes
from lit_sahs.packages import package_dir

RENDER_VERSION = 1  # bump when rendering changes, so cached renders are not reused
IMAGE_SIZE = 512  # rendered images are square: center-cropping processors (LLaVA-1.5's CLIP) keep all of it

# (package, path inside it, name): photos only
_CATALOGUE = (
    ("skimage", ("data", "astronaut.png"), "astronaut"),
    ("skimage", ("data", "brick.png"), "brick"),
    ("skimage", ("data", "camera.png"), "camera"),
    ("skimage", ("data", "cell.png"), "cell"),
    ("skimage", ("data", "chelsea.png"), "chelsea"),
    ("skimage", ("data", "coffee.png"), "coffee"),
    ("skimage", ("data", "coins.png"), "coins"),
    ("skimage", ("data", "grass.png"), "grass"),
    ("skimage", ("data", "gravel.png"), "gravel"),
    ("skimage", ("data", "hubble_deep_field.jpg"), "hubble_deep_field"),
    ("skimage", ("data", "ihc.png"), "ihc"),
    ("skimage", ("data", "moon.png"), "moon"),
    ("skimage", ("data", "motorcycle_left.png"), "motorcycle_left"),
    ("skimage", ("data", "motorcycle_right.png"), "motorcycle_right"),
    ("skimage", ("data", "retina.jpg"), "retina"),
    ("skimage", ("data", "rocket.jpg"), "rocket"),
    ("sklearn", ("datasets", "images", "china.jpg"), "china"),
    ("sklearn", ("datasets", "images", "flower.jpg"), "flower"),
    ("matplotlib", ("mpl-data", "sample_data", "grace_hopper.jpg"), "grace_hopper"),
)


@dataclass(frozen=True)
class NaturalImage:
    name: str
    package: str
    path: Path


@lru_cache(maxsize=None)
def natural_images() -> tuple[NaturalImage, ...]:
    """The catalogued photos present in the installed packages (a package missing, or a version
    without a file, just leaves those out); an error when none is found."""
    found = []
    for package, parts, name in _CATALOGUE:
        try:
            path = package_dir(package).joinpath(*parts)
        except LitSahsError:
            continue
        if path.is_file():
            found.append(NaturalImage(name, package, path))
    if not found:
        raise LitSahsError("no natural images found: install scikit-image, scikit-learn or matplotlib "
                           "(their bundled sample photos are read by path)")
    return tuple(found)


@lru_cache(maxsize=32)
def _load_photo(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def augment(image: Image.Image, rng: random.Random, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> Image.Image:
    """A random crop (50-100% of the area, aspect near the output's), a horizontal flip half the
    time, brightness / contrast / saturation jitter of up to +-25%, resized to `size`."""
    w, h = image.size
    out_w, out_h = size
    target_aspect = out_w / out_h
    area = rng.uniform(0.5, 1.0) * w * h
    aspect = target_aspect * rng.uniform(0.85, 1.0 / 0.85)
    cw = min(w, max(16, round((area * aspect) ** 0.5)))
    ch = min(h, max(16, round((area / aspect) ** 0.5)))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    out = image.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        out = enhancer(out).enhance(rng.uniform(0.75, 1.25))
    return out.resize(size, Image.Resampling.BICUBIC)


def natural_image(key: str, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> tuple[Image.Image, dict]:
    """A deterministic augmented photo for `key`: the photo and the augmentation both come from a
    generator seeded by the key. Returns the image and what was used (photo name)."""
    rng = random.Random(f"natural|{key}")
    photo = rng.choice(natural_images())
    return augment(_load_photo(photo.path), rng, size), {"natural_image": photo.name}


# ---------------------------------------------------------------- text

@lru_cache(maxsize=64)
def font(size: int, style: str = "DejaVuSans-Bold") -> ImageFont.FreeTypeFont:
    """A DejaVu font from matplotlib's bundled fonts (`style`: DejaVuSans, DejaVuSans-Bold,
    DejaVuSansMono-Bold, ...)."""
    path = package_dir("matplotlib") / "mpl-data" / "fonts" / "ttf" / f"{style}.ttf"
    if not path.is_file():
        raise LitSahsError(f"font {path} is missing: reinstall matplotlib, whose DejaVu fonts the visual attacks use")
    return ImageFont.truetype(str(path), size)


def wrap(text: str, fnt: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels; a word wider than a line is broken between characters."""
    lines: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split():
            candidate = f"{line} {word}" if line else word
            if fnt.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            while fnt.getlength(word) > width:  # break an over-long word
                cut = 1
                while cut < len(word) and fnt.getlength(word[:cut + 1]) <= width:
                    cut += 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def fit_text(text: str, width: int, height: int, max_size: int = 48, min_size: int = 12,
             style: str = "DejaVuSans-Bold", spacing: float = 1.25) -> tuple[ImageFont.FreeTypeFont, list[str], int]:
    """The largest font size (down to `min_size`) at which `text` wrapped to `width` fits in
    `height`; returns (font, lines, line height). At `min_size` the lines that do not fit are
    dropped and the last kept one ends with an ellipsis."""
    for size in range(max_size, min_size - 1, -2):
        fnt = font(size, style)
        line_h = round(size * spacing)
        lines = wrap(text, fnt, width)
        if len(lines) * line_h <= height:
            return fnt, lines, line_h
    fnt = font(min_size, style)
    line_h = round(min_size * spacing)
    lines = wrap(text, fnt, width)
    keep = max(1, height // line_h)
    if len(lines) > keep:
        lines = lines[:keep]
        lines[-1] = lines[-1].rstrip(" .,;:") + "…"
    return fnt, lines, line_h


def draw_lines(draw: ImageDraw.ImageDraw, lines: list[str], fnt, x: int, y: int, line_h: int,
               fill=(0, 0, 0), align: str = "left", width: Optional[int] = None) -> int:
    """Draw lines from (x, y) down; returns the y below the last line."""
    for line in lines:
        dx = 0
        if align == "center" and width is not None:
            dx = round((width - fnt.getlength(line)) / 2)
        draw.text((x + dx, y), line, font=fnt, fill=fill)
        y += line_h
    return y


# ---------------------------------------------------------------- content-addressed cache

_EXT = {"PNG": "png", "JPEG": "jpg"}


def encode_image(image: Image.Image, fmt: str = "PNG") -> bytes:
    """Image bytes without metadata (no timestamps), so the same pixels give the same bytes. PNG for
    typography (lossless, small for flat colours); JPEG at quality 92 without chroma subsampling
    for photos (a PNG photo is ~6x larger, and a store keeps one file per distinct image)."""
    buf = io.BytesIO()
    if fmt == "PNG":
        image.save(buf, format="PNG", compress_level=6)
    elif fmt == "JPEG":
        image.convert("RGB").save(buf, format="JPEG", quality=92, subsampling=0, optimize=False)
    else:
        raise LitSahsError(f"unsupported image format {fmt!r}: use PNG or JPEG")
    return buf.getvalue()


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def image_cache_dir() -> Path:
    """`$LIT_SAHS_IMAGE_CACHE` if set, else `$LIT_SAHS_CACHE/images` (default ~/.cache/lit_sahs/images)."""
    override = os.environ.get("LIT_SAHS_IMAGE_CACHE")
    if override:
        d = Path(override).expanduser()
    else:
        from lit_sahs.targets.cache import cache_root  # late: keeps data/ importable without target deps

        d = cache_root() / "images"
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_image(image: Image.Image, fmt: str = "PNG") -> tuple[str, str]:
    """Store `image` in the cache under the sha256 of its encoded bytes; (path, sha256)."""
    data = encode_image(image, fmt)
    sha = bytes_sha256(data)
    path = image_cache_dir() / f"{sha}.{_EXT[fmt]}"
    if not path.is_file() or path.stat().st_size != len(data):
        atomic_write_bytes(path, data)
    return str(path), sha


def cached_render(key: dict, render: Callable[[], Image.Image], fmt: str = "PNG") -> tuple[str, str]:
    """(path, sha256) of the image `render()` draws for `key`, rendering only when this key has not
    been rendered before (or its file was removed). The key is hashed together with the render
    version, Pillow's version and the FreeType version, which decide the pixels."""
    full = {"key": key, "format": fmt, "render_version": RENDER_VERSION, "pillow": PIL.__version__,
            "freetype": ImageFont.core.freetype2_version if hasattr(ImageFont.core, "freetype2_version") else ""}
    khash = bytes_sha256(json.dumps(full, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    keys = image_cache_dir() / "keys"
    keys.mkdir(exist_ok=True)
    memo = keys / khash
    try:
        sha = memo.read_text(encoding="ascii").strip()
        path = image_cache_dir() / f"{sha}.{_EXT[fmt]}"
        if len(sha) == 64 and path.is_file():
            return str(path), sha
    except (OSError, UnicodeDecodeError):
        pass
    path, sha = save_image(render(), fmt)
    atomic_write_bytes(memo, sha.encode("ascii"))
    return path, sha
