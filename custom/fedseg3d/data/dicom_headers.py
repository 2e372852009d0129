"""Read DICOM header fields as checked values, and check that a file's pixels can be decoded.

Scanners, anonymisers and converters write malformed headers (``NumberOfFrames`` of ``'1A'``, a position with a
missing value, text in a spacing). pydicom converts values lazily, so such a field raises a bare ``ValueError``
wherever it is first touched, with no file name, and a site's ``skip_bad_cases`` (which catches ``DataError``)
cannot tell it from a bug. Every read here turns a bad field into a ``DataError`` naming the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.tag import Tag
from pydicom.uid import UID

from fedseg3d.data.errors import DataError

# Values longer than this stay on disk until touched: a header read then never loads the pixel data, yet still
# knows its length (checked against Rows x Columns x frames).
_DEFER_BYTES = 4096
_UNDEFINED_LENGTH = 0xFFFFFFFF  # encapsulated (compressed) pixel data
DECODER_PACKAGES = "pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg, pylibjpeg-rle and pyjpegls (requirements.txt)"


def read_header(path: Path) -> Dataset:
    """The file's dataset with its pixel data (and other large values) left on disk.

    Raises:
        DataError: the file is not readable as DICOM.
    """
    try:
        return pydicom.dcmread(path, defer_size=_DEFER_BYTES)
    except Exception as exc:  # pydicom raises many types for corrupt input; all mean the same to the user
        raise DataError(path, f"not a readable DICOM file ({type(exc).__name__}: {exc})") from exc


def _field_name(keyword: str) -> str:
    return f"{keyword} {Tag(keyword)}"


def _raw_text(ds: Dataset, keyword: str) -> str:
    """The field as written in the file, for messages; the converted value may be what failed."""
    try:
        raw = ds.get_item(keyword, keep_deferred=True)
        value = raw.value if raw is not None else None
        return repr(value.decode("latin-1").strip()) if isinstance(value, bytes) else repr(value)
    except Exception:  # the message must not fail while reporting a failure
        return "<unreadable>"


def field_value(ds: Dataset, path: Path, keyword: str, where: str = "") -> Any:
    """The converted value of a field, or None when absent or empty.

    Raises:
        DataError: pydicom cannot convert the value (for example '1A' in an integer string).
    """
    try:
        value = ds.get(keyword)
    except Exception as exc:
        raise DataError(
            path, f"{where}{_field_name(keyword)} is {_raw_text(ds, keyword)}, which is not a valid value ({exc})"
        ) from exc
    return None if value is None or value == "" else value


def int_field(ds: Dataset, path: Path, keyword: str, *, default: int | None = None, minimum: int = 0) -> int:
    """A whole-number field (IS, US, UL), at least ``minimum``.

    Raises:
        DataError: missing without a default, not a whole number, or below ``minimum``.
    """
    value = field_value(ds, path, keyword)
    if value is None:
        if default is None:
            raise DataError(path, f"missing {_field_name(keyword)}")
        return default
    try:
        number = int(value)
        if number != float(value):
            raise ValueError("not a whole number")
    except (TypeError, ValueError) as exc:
        raise DataError(path, f"{_field_name(keyword)} is {value!r}, expected a whole number") from exc
    if number < minimum:
        raise DataError(path, f"{_field_name(keyword)} is {number}, expected at least {minimum}")
    return number


def floats_field(ds: Dataset, path: Path, keyword: str, count: int, where: str = "") -> np.ndarray:
    """A multi-valued decimal field (DS, FD) with exactly ``count`` finite values.

    ``where`` prefixes the message when the field sits inside a functional group ("frame 3 PlanePositionSequence: ").

    Raises:
        DataError: missing, with another number of values, or with a value that is not a finite number.
    """
    value = field_value(ds, path, keyword, where)
    if value is None:
        raise DataError(path, f"{where}missing {_field_name(keyword)}")
    values = list(value) if isinstance(value, list | tuple | pydicom.multival.MultiValue) else [value]
    if len(values) != count:
        raise DataError(path, f"{where}{_field_name(keyword)} has {len(values)} values {values}, expected {count}")
    try:
        numbers = np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(path, f"{where}{_field_name(keyword)} is {values}, expected {count} numbers") from exc
    if not np.isfinite(numbers).all():
        raise DataError(path, f"{where}{_field_name(keyword)} is {values}, expected finite numbers")
    return numbers


def check_image_object(ds: Dataset, path: Path) -> None:
    """Refuse non-image objects (structured reports, segmentations, presentation states) and colour images.

    Raises:
        DataError: the SOP class is not an image storage class, the pixel data is missing, or it is not greyscale.
    """
    sop_class = field_value(ds, path, "SOPClassUID") or ds.get("file_meta", Dataset()).get("MediaStorageSOPClassUID")
    if sop_class is not None:
        name = UID(str(sop_class)).name
        if name != str(sop_class) and "Image Storage" not in name:
            raise DataError(path, f"SOP class {name} ({sop_class}) is not an image storage class; not an image")
    if "PixelData" not in ds:
        raise DataError(path, "no PixelData (7FE0,0010): not an image, or the file ends before its pixel data")
    photometric = str(field_value(ds, path, "PhotometricInterpretation") or "MONOCHROME2")
    samples = int_field(ds, path, "SamplesPerPixel", default=1, minimum=1)
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or samples != 1:
        raise DataError(
            path,
            f"colour image (PhotometricInterpretation {photometric}, SamplesPerPixel {samples}); "
            "only greyscale MONOCHROME1/2 images with SamplesPerPixel 1 are supported",
        )


def transfer_syntax(ds: Dataset, path: Path) -> UID:
    """The file's TransferSyntaxUID (file meta), defaulting as pydicom does for files without a meta header."""
    meta = ds.get("file_meta", Dataset())
    uid = meta.get("TransferSyntaxUID")
    if uid is None:
        return UID("1.2.840.10008.1.2")  # implicit VR little endian, what pydicom assumes for a bare dataset
    return UID(str(uid))


def check_decodable(ds: Dataset, path: Path) -> None:
    """The pixel data can be decoded here: pydicom has a decoder for the transfer syntax and a plugin installed.

    Raises:
        DataError: naming the transfer syntax and the packages whose plugins decode it.
    """
    uid = transfer_syntax(ds, path)
    label = f"TransferSyntaxUID {uid.name} ({uid})"
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as exc:
        raise DataError(path, f"{label}: pydicom has no pixel data decoder for it; convert the file") from exc
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a pixel data plugin"
        raise DataError(
            path,
            f"{label}: no decoder installed for it (pydicom's plugins need: {needs}); install the packages this "
            f"project pins: {DECODER_PACKAGES}",
        )


def check_pixel_data_length(ds: Dataset, path: Path, rows: int, cols: int, frames: int) -> None:
    """Uncompressed pixel data must hold every frame: a truncated file otherwise loads with garbage or fails late.

    Raises:
        DataError: PixelData holds fewer bytes than Rows x Columns x frames x BitsAllocated / 8.
    """
    element = ds.get_item("PixelData", keep_deferred=True)
    length = getattr(element, "length", None)
    if length is None:
        length = len(element.value) if element is not None and element.value is not None else 0
    if length == _UNDEFINED_LENGTH:
        return  # compressed: each frame's size is only known after decoding, which reports truncation itself
    bits = int_field(ds, path, "BitsAllocated", minimum=1)
    expected = rows * cols * frames * bits // 8
    if length < expected:
        raise DataError(
            path,
            f"PixelData (7FE0,0010) holds {length} bytes, expected {expected} for Rows {rows} x Columns {cols} x "
            f"{frames} frame(s) x BitsAllocated {bits}: the file is truncated or its header is wrong",
        )
