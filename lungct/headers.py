"""A scan file's header, checked before a single voxel is allocated or decoded.

A header states how large its image is, and image libraries believe it: a few megabytes of
zlib data can claim 2048^3 voxels and make a reader allocate 16 GB; a ``CompressedDataSize`` of
8 GiB on a 20 KB file makes MetaIO allocate 8 GiB; a truncated NIfTI file reads without an error;
a corrupt ``.zraw`` decodes to a volume of zeros with only a note on stderr. So the suite reads
each header itself, refuses a claimed voxel count above a limit, refuses non-finite or
degenerate geometry, and checks that the bytes on disk are exactly what the header describes.

The limit is :data:`DEFAULT_MAX_VOXELS` (2^30, about 1.07 G voxels: 1024^3, five times the
largest LUNA16 scan; reading that many int16 voxels takes 2 GB). Raise it with the environment
variable ``LUNGCT_MAX_VOXELS`` or the ``max_voxels`` argument of :func:`lungct.io.read_scan`.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lungct.errors import LungCTError

DEFAULT_MAX_VOXELS = 1 << 30
"""Largest voxel count a header may claim unless ``LUNGCT_MAX_VOXELS`` or an argument says more."""

MAX_VOXELS_ENV = "LUNGCT_MAX_VOXELS"
"""Environment variable that overrides :data:`DEFAULT_MAX_VOXELS`."""

MAX_HEADER_BYTES = 1 << 20
"""A MetaImage header is a few hundred bytes of text; more than this is not a header."""

_READ_CHUNK = 1 << 20
_OUT_CHUNK = 1 << 22

# MetaIO's element types and their numpy types (MET_LONG is 32-bit in MetaIO, as in ITK).
METAIMAGE_DTYPES = {
    "MET_CHAR": "i1",
    "MET_UCHAR": "u1",
    "MET_SHORT": "i2",
    "MET_USHORT": "u2",
    "MET_INT": "i4",
    "MET_UINT": "u4",
    "MET_LONG": "i4",
    "MET_ULONG": "u4",
    "MET_LONG_LONG": "i8",
    "MET_ULONG_LONG": "u8",
    "MET_FLOAT": "f4",
    "MET_DOUBLE": "f8",
}

# NIfTI datatype codes of one scalar per voxel, and the others by name for the message.
NIFTI_DTYPES = {
    2: "u1",
    4: "i2",
    8: "i4",
    16: "f4",
    64: "f8",
    256: "i1",
    512: "u2",
    768: "u4",
    1024: "i8",
    1280: "u8",
}
_NIFTI_OTHER = {
    32: "complex64",
    128: "RGB",
    1536: "float128",
    1792: "complex128",
    2048: "complex256",
    2304: "RGBA",
}


def max_voxels_limit(max_voxels: int | None = None) -> int:
    """The voxel-count limit in force: ``max_voxels`` if given, else ``LUNGCT_MAX_VOXELS``, else
    :data:`DEFAULT_MAX_VOXELS`.

    Raises:
        LungCTError: the argument or the variable is not a positive whole number.
    """
    if max_voxels is not None:
        if isinstance(max_voxels, bool) or not isinstance(max_voxels, int) or max_voxels < 1:
            raise LungCTError(
                None, f"max_voxels must be a positive whole number, got {max_voxels!r}"
            )
        return max_voxels
    text = os.environ.get(MAX_VOXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_VOXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise LungCTError(
            MAX_VOXELS_ENV, f"must be a positive whole number of voxels, got {text!r}"
        )
    return value


def check_voxel_count(path: str | os.PathLike, dims: list[int], max_voxels: int) -> int:
    """Refuse a claimed size above the limit before anything of that size is allocated.

    Returns:
        The number of voxels (Python integers: no overflow however large the claim).
    """
    count = math.prod(dims)
    if count > max_voxels:
        claim = "x".join(str(d) for d in dims)
        raise LungCTError(
            path,
            f"header claims {claim} = {count:,} voxels, more than the limit of {max_voxels:,} "
            f"(set {MAX_VOXELS_ENV} to read a larger scan)",
        )
    return count


def _numbers(path: Path, key: str, text: str, count: int) -> list[float]:
    try:
        values = [float(v) for v in text.split()]
    except ValueError:
        values = []
    if len(values) != count:
        raise LungCTError(path, f"MetaImage {key} {text[:80]!r} is not {count} numbers")
    if not all(math.isfinite(v) for v in values):
        raise LungCTError(path, f"MetaImage {key} {text[:80]!r} is not finite")
    return values


def _flag(path: Path, fields: dict[str, str], keys: tuple[str, ...], default: bool) -> bool:
    """A True/False field (MetaIO also writes 1/0); where two names mean the same, they must agree."""
    found = {}
    for key in keys:
        if key in fields:
            value = fields[key].lower()
            if value not in ("true", "false", "1", "0"):
                raise LungCTError(path, f"MetaImage {key} is {fields[key][:40]!r}, not True/False")
            found[key] = value in ("true", "1")
    if len(set(found.values())) > 1:
        raise LungCTError(path, f"MetaImage {' and '.join(found)} disagree")
    return next(iter(found.values()), default)


def metaimage_fields(path: str | os.PathLike) -> tuple[dict[str, str], int]:
    """The ``Key = Value`` fields of a MetaImage header and the byte offset where it ends.

    The header ends with its ``ElementDataFile`` line; for a ``.mha`` the pixel data follows at
    the returned offset. Only the first :data:`MAX_HEADER_BYTES` are read, so a binary file
    named ``.mhd`` cannot make this read it whole.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(MAX_HEADER_BYTES)
    except OSError as exc:
        raise LungCTError(path, f"cannot be opened ({exc.strerror})") from None
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(head):
        newline = head.find(b"\n", pos)
        end = len(head) if newline < 0 else newline + 1
        line = head[pos:end].decode("latin-1").strip()
        pos = end
        if not line:
            continue
        if "=" not in line:
            raise LungCTError(path, f"malformed MetaImage header line {line[:60]!r}")
        key, value = (part.strip() for part in line.split("=", 1))
        fields[key] = value
        if key == "ElementDataFile":
            return fields, pos
    if len(head) == MAX_HEADER_BYTES:
        raise LungCTError(
            path,
            f"MetaImage header has no ElementDataFile line in its first {MAX_HEADER_BYTES} bytes",
        )
    return fields, pos


@dataclass(frozen=True)
class MetaImageHeader:
    """A checked MetaImage header and where its pixel data lies.

    Args:
        path: the ``.mhd``/``.mha`` file.
        size: voxels along ``(x, y, z)``.
        dtype: numpy type of one voxel as stored, byte order included.
        compressed: the data is a zlib (or gzip) stream.
        data_path: the file holding the pixel data (``path`` itself for ``.mha``).
        data_offset: where the pixel data starts in ``data_path``.
        data_length: bytes of pixel data on disk (compressed bytes when ``compressed``).
        length_stated: the header states ``data_length`` (always for plain data; for compressed
            data where ``CompressedDataSize`` is given), so it was checked against the file.
    """

    path: Path
    size: tuple[int, int, int]
    dtype: np.dtype
    compressed: bool
    data_path: Path
    data_offset: int
    data_length: int
    length_stated: bool = True

    @property
    def voxels(self) -> int:
        """Voxels the header claims."""
        return math.prod(self.size)

    @property
    def nbytes(self) -> int:
        """Bytes of decoded pixel data the header claims."""
        return self.voxels * self.dtype.itemsize

    @property
    def data_name(self) -> str:
        """The data file's name as messages show it."""
        return self.data_path.name


def read_metaimage_header(
    path: str | os.PathLike, max_voxels: int | None = None
) -> MetaImageHeader:
    """Parse and check a MetaImage header; check its data file's length (not its content).

    Checked: 3-D, one channel, known element type, binary data, DimSize whole numbers >= 2 and
    at most ``max_voxels`` in all (see :func:`max_voxels_limit`), finite positive
    spacing, finite origin, finite non-singular TransformMatrix, the data file present, and for
    plain data its exact length; for compressed data, ``CompressedDataSize`` (if given) equals
    the bytes on disk. Whether compressed data decodes to exactly the claimed size is checked
    while decoding (:func:`read_metaimage_pixels`, :func:`check_metaimage_data`).

    Raises:
        LungCTError: naming the file and the first problem found.
    """
    path = Path(path)
    limit = max_voxels_limit(max_voxels)
    fields, header_end = metaimage_fields(path)
    for key in ("NDims", "DimSize", "ElementType", "ElementDataFile"):
        if key not in fields:
            raise LungCTError(path, f"MetaImage header has no {key} field")
    try:
        ndims = int(fields["NDims"])
    except ValueError:
        raise LungCTError(
            path, f"MetaImage NDims {fields['NDims'][:40]!r} is not an integer"
        ) from None
    try:
        dims = [int(v) for v in fields["DimSize"].split()]
    except ValueError:
        raise LungCTError(
            path, f"MetaImage DimSize {fields['DimSize'][:80]!r} is not whole numbers"
        ) from None
    if ndims != 3 or len(dims) != 3:
        raise LungCTError(path, f"is a {ndims}-D image (DimSize {dims}); a CT scan must be 3-D")
    if min(dims) < 2:
        raise LungCTError(path, f"has size {dims}; a 3-D CT scan needs >= 2 voxels per axis")
    check_voxel_count(path, dims, limit)
    channels_text = fields.get("ElementNumberOfChannels", "1")
    if channels_text != "1":
        raise LungCTError(
            path,
            f"has ElementNumberOfChannels {channels_text[:20]!r}; a CT scan has one value per voxel",
        )
    etype = fields["ElementType"]
    if etype not in METAIMAGE_DTYPES:
        raise LungCTError(path, f"unsupported ElementType {etype[:40]!r}")
    if not _flag(path, fields, ("BinaryData",), True):
        raise LungCTError(
            path, "has text pixel data (BinaryData = False); only binary is supported"
        )
    big_endian = _flag(path, fields, ("ElementByteOrderMSB", "BinaryDataByteOrderMSB"), False)
    dtype = np.dtype(METAIMAGE_DTYPES[etype]).newbyteorder(">" if big_endian else "<")
    for key in ("ElementSpacing", "ElementSize"):
        if key in fields:
            spacing = _numbers(path, key, fields[key], 3)
            if min(spacing) <= 0:
                raise LungCTError(path, f"MetaImage {key} {spacing} must be positive")
    for key in ("Offset", "Position", "Origin"):
        if key in fields:
            _numbers(path, key, fields[key], 3)
    for key in ("TransformMatrix", "Rotation", "Orientation"):
        if key in fields:
            matrix = np.asarray(_numbers(path, key, fields[key], 9)).reshape(3, 3)
            if abs(np.linalg.det(matrix)) < 1e-6:
                raise LungCTError(path, f"MetaImage {key} {fields[key][:80]!r} is singular")
    compressed = _flag(path, fields, ("CompressedData",), False)

    data_file = fields["ElementDataFile"]
    if data_file == "LOCAL":
        data_path, offset = path, header_end
    elif data_file.startswith("LIST") or "%" in data_file:
        raise LungCTError(
            path,
            f"pixel data in several files (ElementDataFile {data_file[:40]!r}) is not supported; "
            "convert the scan to one .mhd/.raw or .mha",
        )
    else:
        data_path, offset = path.parent / data_file, 0
        if not data_path.exists():
            raise LungCTError(path, f"pixel data file {data_file!r} is missing")
        if not data_path.is_file():
            raise LungCTError(path, f"pixel data file {data_file!r} is not a file")
    header_size = fields.get("HeaderSize", "0")
    try:
        skip = int(header_size)
    except ValueError:
        raise LungCTError(
            path, f"MetaImage HeaderSize {header_size[:40]!r} is not an integer"
        ) from None
    if skip != 0 and data_file == "LOCAL":
        raise LungCTError(path, "HeaderSize with LOCAL (embedded) pixel data is not supported")
    if skip < -1 or (skip == -1 and compressed):
        raise LungCTError(path, f"MetaImage HeaderSize {skip} is not supported here")
    file_size = data_path.stat().st_size
    expected = math.prod(dims) * dtype.itemsize
    name = data_path.name
    if skip == -1:
        offset = max(file_size - expected, 0)
    else:
        offset += skip
    available = file_size - offset

    if compressed:
        if available <= 0:
            raise LungCTError(path, f"compressed pixel data {name!r} is empty")
        if "CompressedDataSize" in fields:
            text = fields["CompressedDataSize"]
            try:
                claimed = int(text)
            except ValueError:
                raise LungCTError(
                    path, f"MetaImage CompressedDataSize {text[:40]!r} is not an integer"
                ) from None
            if claimed != available:
                raise LungCTError(
                    path,
                    f"compressed pixel data {name!r} has {available} bytes but the header's "
                    f"CompressedDataSize is {claimed} (truncated or replaced file)",
                )
    elif available < expected:
        raise LungCTError(
            path,
            f"pixel data file {name!r} has {max(available, 0)} bytes but the header's DimSize "
            f"{dims} x {etype} needs {expected} (truncated file or wrong DimSize)",
        )
    elif available > expected:
        raise LungCTError(
            path,
            f"pixel data file {name!r} has {available} bytes but the header's DimSize {dims} "
            f"x {etype} needs only {expected} (header/array size mismatch)",
        )
    return MetaImageHeader(
        path=path,
        size=(dims[0], dims[1], dims[2]),
        dtype=dtype,
        compressed=compressed,
        data_path=data_path,
        data_offset=offset,
        data_length=available,
        length_stated=not compressed or "CompressedDataSize" in fields,
    )


def read_metaimage_pixels(header: MetaImageHeader) -> np.ndarray:
    """The voxels of a checked MetaImage as a ``(z, y, x)`` array in native byte order.

    Compressed data is inflated here, straight into the one array of the claimed size, so a
    stream that is corrupt, ends early or decodes to more or fewer bytes than the header claims
    is refused (MetaIO would print "Uncompress failed" and return zeros), and a stream that
    decodes to more is stopped as soon as it passes the claimed size.

    Raises:
        LungCTError: the data does not match its header.
    """
    count = header.voxels
    path = header.path
    try:
        with open(header.data_path, "rb") as f:
            f.seek(header.data_offset)
            if header.compressed:
                out = np.empty(count, dtype=header.dtype)
                _inflate_into(f, header, out.view(np.uint8))
            else:
                out = np.fromfile(f, dtype=header.dtype, count=count)
                if out.size != count:
                    raise LungCTError(
                        path, f"pixel data file {header.data_name!r} ended early (truncated)"
                    )
    except OSError as exc:
        raise LungCTError(
            path, f"pixel data file {header.data_name!r} cannot be read ({exc.strerror})"
        ) from None
    if not out.dtype.isnative:
        out.byteswap(inplace=True)
        out = out.view(out.dtype.newbyteorder("="))
    x, y, z = header.size
    return out.reshape(z, y, x)


def check_metaimage_data(header: MetaImageHeader) -> None:
    """Check that a checked MetaImage's compressed pixel data inflates to exactly the bytes its
    header claims, counting them without keeping them (plain data needs nothing more than
    :func:`read_metaimage_header`'s length check).

    Raises:
        LungCTError: the stream is corrupt, ends early, or holds more or fewer bytes.
    """
    if not header.compressed:
        return
    try:
        with open(header.data_path, "rb") as f:
            f.seek(header.data_offset)
            _inflate_into(f, header, None)
    except OSError as exc:
        raise LungCTError(
            header.path,
            f"pixel data file {header.data_name!r} cannot be read ({exc.strerror})",
        ) from None


def _inflate_into(f, header: MetaImageHeader, out: np.ndarray | None) -> None:
    """Inflate ``header.data_length`` bytes from ``f`` into ``out`` (uint8 of
    ``header.nbytes``), exactly filling it; with ``out`` None, only count the bytes."""
    path, name = header.path, header.data_name
    want = header.nbytes
    d = zlib.decompressobj(zlib.MAX_WBITS | 32)  # zlib or gzip header, as MetaIO accepts
    pos = 0
    left = header.data_length
    try:
        while left > 0 and not d.eof:
            data = f.read(min(_READ_CHUNK, left))
            if not data:
                break
            left -= len(data)
            while True:
                room = min(want - pos + 1, _OUT_CHUNK)
                piece = d.decompress(data, room)
                if pos + len(piece) > want:
                    raise LungCTError(
                        path,
                        f"compressed pixel data {name!r} holds more than the {want} bytes the "
                        "header's DimSize and ElementType describe (header/array size mismatch)",
                    )
                if out is not None:
                    out[pos : pos + len(piece)] = np.frombuffer(piece, np.uint8)
                pos += len(piece)
                data = d.unconsumed_tail
                if d.eof or (not data and len(piece) < room):
                    break
    except zlib.error as exc:
        raise LungCTError(path, f"compressed pixel data {name!r} is corrupt ({exc})") from None
    if not d.eof:
        raise LungCTError(
            path,
            f"compressed pixel data {name!r} is truncated (its stream ends after {pos} of "
            f"{want} bytes)",
        )
    if pos != want:
        raise LungCTError(
            path,
            f"compressed pixel data {name!r} holds {pos} bytes but the header needs {want} "
            "(header/array size mismatch)",
        )
    trailing = len(d.unused_data) + left
    if trailing:
        raise LungCTError(
            path, f"compressed pixel data {name!r} has {trailing} bytes after its zlib stream"
        )


@dataclass(frozen=True)
class NiftiHeader:
    """A checked NIfTI-1 header.

    Args:
        path: the ``.nii``/``.nii.gz`` file.
        size: voxels along ``(x, y, z)``.
        itemsize: bytes per voxel.
        vox_offset: where the voxels start in the (decompressed) file.
    """

    path: Path
    size: tuple[int, int, int]
    itemsize: int
    vox_offset: int

    @property
    def file_bytes(self) -> int:
        """Length the (decompressed) file must have: header, extensions and voxels."""
        return self.vox_offset + math.prod(self.size) * self.itemsize


_N1 = 348

# Offsets and struct formats of the NIfTI-1 fields checked here.
_NIFTI1_LAYOUT = {
    "dim": (40, "8h"),
    "datatype": (70, "h"),
    "pixdim": (76, "8f"),
    "vox_offset": (108, "f"),
    "qform_code": (252, "h"),
    "sform_code": (254, "h"),
    "quatern": (256, "6f"),
    "srow": (280, "12f"),
}


def _nifti_fields(path: Path, head: bytes) -> dict:
    """The fields this suite checks, from a NIfTI-1 header of either byte order."""
    for order in "<>":
        if len(head) < _N1:
            break
        (sizeof_hdr,) = struct.unpack(order + "i", head[:4])
        if sizeof_hdr == 540 and head[4:8] in (b"n+2\0", b"ni2\0"):
            raise LungCTError(
                path, "is a NIfTI-2 file; only NIfTI-1 can be read (convert it to NIfTI-1)"
            )
        if sizeof_hdr != _N1:
            continue
        magic = head[344:348]
        if magic == b"ni1\0":
            raise LungCTError(
                path, "is the header of a NIfTI .hdr/.img pair, not a single-file NIfTI"
            )
        if magic != b"n+1\0":
            break
        fields: dict = {}
        for name, (offset, fmt) in _NIFTI1_LAYOUT.items():
            values = struct.unpack_from(order + fmt, head, offset)
            fields[name] = list(values) if len(values) > 1 else values[0]
        return fields
    raise LungCTError(path, "cannot be read as an image (not a NIfTI-1 file)")


def read_nifti_header(path: str | os.PathLike, max_voxels: int | None = None) -> NiftiHeader:
    """Parse and check a NIfTI-1 header, then the file's (decompressed) length.

    Checked: a single-file NIfTI, 3-D (trailing axes of length 1 allowed), >= 2 voxels per axis
    and at most ``max_voxels`` in all (see :func:`max_voxels_limit`), one scalar per voxel,
    finite positive ``pixdim`` (a 0 would silently become 1 mm), finite quaternion and offsets
    when ``qform_code`` is set, a finite non-singular affine when ``sform_code`` is set, and a
    length of exactly ``vox_offset + voxels x bytes per voxel``: a truncated file is refused
    (the NIfTI reader would return it padded), and a ``.nii.gz`` is decompressed in chunks,
    counted but not kept, and stopped once it passes that length.

    Raises:
        LungCTError: naming the file and the first problem found.
    """
    path = Path(path)
    limit = max_voxels_limit(max_voxels)
    gz = path.name.lower().endswith(".gz")
    try:
        opener = gzip.open if gz else open
        with opener(path, "rb") as f:
            head = f.read(_N1)
    except (OSError, EOFError, zlib.error) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise LungCTError(path, f"cannot be read as an image ({reason[:120]})") from None
    h = _nifti_fields(path, head)
    dim = h["dim"]
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise LungCTError(path, f"NIfTI dim[0] is {ndim}; it must be 1 to 7")
    dims = dim[1 : ndim + 1]
    if ndim < 3 or any(d != 1 for d in dims[3:]):
        shown = ndim if ndim < 3 else 3 + sum(1 for d in dims[3:] if d != 1)
        raise LungCTError(path, f"is a {shown}-D image (dim {dims}); a CT scan must be 3-D")
    if min(dims[:3]) < 2:
        raise LungCTError(path, f"has size {dims[:3]}; a 3-D CT scan needs >= 2 voxels per axis")
    check_voxel_count(path, dims, limit)
    code = h["datatype"]
    if code not in NIFTI_DTYPES:
        kind = _NIFTI_OTHER.get(code)
        if kind:
            raise LungCTError(path, f"has {kind} voxels; a CT scan has one number per voxel")
        raise LungCTError(path, f"unknown NIfTI datatype {code}")
    spacing = h["pixdim"][1:4]
    if not all(math.isfinite(v) and v > 0 for v in spacing):
        raise LungCTError(
            path,
            f"NIfTI pixdim (voxel size) [{', '.join(f'{v:.6g}' for v in spacing)}] must be "
            "positive and finite",
        )
    if h["qform_code"] > 0:
        quatern = h["quatern"]
        if not all(math.isfinite(v) for v in [*quatern, h["pixdim"][0]]):
            raise LungCTError(path, "NIfTI qform (quaternion, offset or qfac) is not finite")
        if sum(v * v for v in quatern[:3]) > 1 + 1e-4:
            raise LungCTError(path, "NIfTI qform quaternion is not a rotation (b^2+c^2+d^2 > 1)")
    if h["sform_code"] > 0:
        srow = np.asarray(h["srow"], dtype=np.float64).reshape(3, 4)
        if not np.all(np.isfinite(srow)):
            raise LungCTError(path, "NIfTI sform (srow_x/y/z) is not finite")
        if abs(np.linalg.det(srow[:, :3])) < 1e-9:
            raise LungCTError(path, "NIfTI sform (srow_x/y/z) is singular")
    vox_offset = float(h["vox_offset"])
    if not math.isfinite(vox_offset) or vox_offset != int(vox_offset) or vox_offset < _N1:
        raise LungCTError(path, f"NIfTI vox_offset {vox_offset} is not a whole number >= {_N1}")
    header = NiftiHeader(
        path=path,
        size=(dims[0], dims[1], dims[2]),
        itemsize=np.dtype(NIFTI_DTYPES[code]).itemsize,
        vox_offset=int(vox_offset),
    )
    _check_nifti_length(header, gz)
    return header


def _check_nifti_length(header: NiftiHeader, gz: bool) -> None:
    path = header.path
    expected = header.file_bytes
    if gz:
        total = 0
        try:
            with gzip.open(path, "rb") as f:
                while chunk := f.read(min(_OUT_CHUNK, expected + 1 - total)):
                    total += len(chunk)
                    if total > expected:
                        break
        except EOFError:
            raise LungCTError(
                path, f"is truncated (its gzip stream ends after {total} of {expected} bytes)"
            ) from None
        except (OSError, zlib.error) as exc:
            raise LungCTError(path, f"gzip data is corrupt ({str(exc)[:120]})") from None
    else:
        total = path.stat().st_size
    if total < expected:
        raise LungCTError(
            path,
            f"has {total} bytes but its header (vox_offset {header.vox_offset}, size "
            f"{list(header.size)} x {header.itemsize} bytes) needs {expected} (truncated file)",
        )
    if total > expected:
        raise LungCTError(
            path,
            f"has more than the {expected} bytes its header (vox_offset {header.vox_offset}, size "
            f"{list(header.size)} x {header.itemsize} bytes) describes (header/array size mismatch)",
        )
