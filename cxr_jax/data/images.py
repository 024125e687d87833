"""Reads one chest X-ray file (PNG, JPEG or DICOM) as a 2-D grayscale array.

`read_image(path)` returns uint8 or uint16 [H, W]. PNG keeps its bit depth; JPEG is
8-bit; DICOM always comes back as uint16 using the full 0..65535 range, rendered the
way a viewer would show it:

1. Modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence): stored values
   to physical values.
2. VOI: the first Window Center/Width pair through the VOI LUT Function (LINEAR by
   default, per DICOM PS3.3 C.11.2.1.2), or else the first VOI LUT Sequence item.
   Without either, the image's own value range maps linearly onto 0..65535, which
   keeps every distinct value distinct (detectors rarely fill their nominal bit
   depth, so mapping the nominal range would store most films nearly black).
3. MONOCHROME1 (low values white) is inverted, so bone is bright in every output.

Compressed DICOM decodes through pydicom's plugins: RLE natively, JPEG baseline and
JPEG 2000 through Pillow, JPEG lossless / JPEG-LS / JPEG 2000 / HTJ2K through
pylibjpeg with pylibjpeg-libjpeg or pylibjpeg-openjpeg. Every failure raises
`ImageError` (a ValueError) whose message starts with the file's path and says
what is wrong, so a dataset build can report or skip exactly that file.

`encode_raw`/`decode_raw` are the datasets' uncompressed stored form (builders'
`raw_size`): the array in NumPy's .npy format, whose header records shape and dtype.

This module does not import TensorFlow or TFDS: embedding tools use it directly.
"""

import functools
import io
import math
import os
import struct
from typing import Tuple, Union

import cv2
import numpy as np

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
JPEG_SIGNATURE = b'\xff\xd8\xff'
DICOM_MAGIC_OFFSET, DICOM_MAGIC = 128, b'DICM'
# DICOM files without the 128-byte preamble are still common in hospital exports; the
# extension is then the only hint.
DICOM_EXTENSIONS = ('.dcm', '.dicom', '.dic')
UINT16_MAX = 65535
PIXEL_DATA_TAG_BYTES = b'\xe0\x7f\x10\x00'  # (7FE0,0010), little endian.
NPY_MAGIC = b'\x93NUMPY'
RAW_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))


class ImageError(ValueError):
  """An image that cannot be read; the message names the file and the reason."""


def read_image(path: Union[str, os.PathLike]) -> np.ndarray:
  """The file's pixels as 2-D grayscale uint8 (8-bit PNG/JPEG) or uint16 (16-bit PNG, DICOM)."""
  path = os.fspath(path)
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except FileNotFoundError:
    raise ImageError(f'{path}: file not found') from None
  except OSError as e:
    raise ImageError(f'{path}: cannot read file ({e.strerror or e})') from None
  if not data:
    raise ImageError(f'{path}: file is empty')
  if data.startswith(PNG_SIGNATURE):
    image = _decode_png(data, path)
  elif data.startswith(JPEG_SIGNATURE):
    image = _decode_jpeg(data, path)
  elif data[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + 4] == DICOM_MAGIC:
    image = _decode_dicom(data, path, force=False)
  elif path.lower().endswith(DICOM_EXTENSIONS):
    image = _decode_dicom(data, path, force=True)
  else:
    raise ImageError(f'{path}: unknown image format (first bytes {data[:8]!r}); expected PNG, '
                     'JPEG or DICOM')
  if image.ndim != 2 or image.dtype not in (np.uint8, np.uint16) or 0 in image.shape:
    raise ImageError(f'{path}: decoded to an unusable array {image.dtype}{list(image.shape)}')
  return image


# --- stored raw arrays ----------------------------------------------------------------


def encode_raw(image: np.ndarray) -> bytes:
  """uint8/uint16 [H, W] or [H, W, C] -> .npy bytes: the pixels as they are, no codec."""
  if image.dtype not in RAW_DTYPES or image.ndim not in (2, 3):
    raise ValueError(f'raw images are uint8 or uint16 [H, W(, C)], got {image.dtype}'
                     f'{list(image.shape)}')
  buffer = io.BytesIO()
  np.lib.format.write_array(buffer, np.ascontiguousarray(image), allow_pickle=False)
  return buffer.getvalue()


def is_raw(data) -> bool:
  """Whether encoded image bytes (bytes or a uint8 array) are `encode_raw`'s form."""
  return bytes(data[:len(NPY_MAGIC)]) == NPY_MAGIC


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> Tuple[Tuple[int, ...], np.dtype]:
  """(shape, dtype) of a .npy header. Cached: a dataset's records share a few headers,
  and parsing one costs more than the rest of decoding."""
  stream = io.BytesIO(header)
  version = np.lib.format.read_magic(stream)
  read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
          else np.lib.format.read_array_header_2_0)
  shape, fortran_order, dtype = read(stream)
  if fortran_order or dtype not in RAW_DTYPES or len(shape) not in (2, 3):
    raise ValueError(f'the header describes {"a Fortran-order " if fortran_order else ""}'
                     f'{dtype}{list(shape)} array; raw images are uint8 or uint16 '
                     '[H, W(, C)] in C order')
  return shape, dtype


def decode_raw(data) -> np.ndarray:
  """`encode_raw`'s bytes -> the array, without copying (read-only); checks the size.

  Raises ImageError naming what the header promised and what the record holds.
  """
  data = memoryview(data).cast('B')
  if len(data) < 12 or not is_raw(data):
    raise ImageError(f'raw image: {len(data)} bytes that do not start with the .npy '
                     f'signature {NPY_MAGIC!r}')
  # Version 1 stores the header length in 2 bytes, versions 2 and 3 in 4.
  length_bytes = 2 if data[6] == 1 else 4
  header_end = 8 + length_bytes + int.from_bytes(data[8:8 + length_bytes], 'little')
  try:
    shape, dtype = _npy_header(bytes(data[:header_end]))
  except ValueError as e:
    raise ImageError(f'raw image: unusable .npy header ({e})') from None
  expected = math.prod(shape) * dtype.itemsize
  if len(data) - header_end != expected:
    raise ImageError(f'raw image: the header describes {dtype}{list(shape)} ({expected} bytes) '
                     f'but the record holds {len(data) - header_end} bytes of pixels; '
                     'the record is truncated or corrupt')
  return np.frombuffer(data, dtype, offset=header_end).reshape(shape)


# --- PNG and JPEG --------------------------------------------------------------------


# JPEG codes colour as luma plus subsampled chroma, so a gray film saved as a colour
# JPEG comes back with channels a few levels apart; a PNG is lossless and must match.
JPEG_CHANNEL_TOLERANCE = 8


def _to_gray(image: np.ndarray, path: str, kind: str, tolerance: int = 0) -> np.ndarray:
  """A gray film, also one stored as RGB(A) with equal channels; colour is refused.

  Converting a colour image to luma would train or embed something no X-ray detector
  produced (annotations, photographs of films), so unequal channels are an error.
  """
  if image.ndim == 2:
    return image
  if image.shape[2] == 1:
    return image[..., 0]
  if image.shape[2] == 2:  # Gray + alpha: the alpha channel carries no anatomy.
    return np.ascontiguousarray(image[..., 0])
  colour = image[..., :3].astype(np.int32)  # The alpha channel carries no anatomy.
  difference = int(max(np.abs(colour[..., 1] - colour[..., 0]).max(),
                       np.abs(colour[..., 2] - colour[..., 0]).max()))
  if difference > tolerance:
    raise ImageError(
        f'{path}: a colour {kind} (its channels differ by up to {difference} levels); '
        'chest X-rays are grayscale. A gray film stored as RGB is read when its channels '
        f'are equal{f" (to within {tolerance} levels for JPEG)" if tolerance else ""}; '
        'convert a colour file to gray yourself if that is what you mean.')
  if not tolerance:
    return np.ascontiguousarray(image[..., 0])
  return np.rint(colour.mean(axis=-1)).astype(image.dtype)


def _decode_png(data: bytes, path: str) -> np.ndarray:
  # libpng checks every chunk's CRC and the stream's length, so cv2 returns None for
  # truncated or corrupted files rather than a partial image.
  image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  if image is None:
    raise ImageError(f'{path}: truncated or corrupt PNG (the decoder rejected it)')
  return _to_gray(image, path, 'PNG')


def _decode_jpeg(data: bytes, path: str) -> np.ndarray:
  # Pillow rather than cv2: libjpeg only warns about a truncated stream and cv2 then
  # returns the half-grey image, while Pillow raises.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(data)) as pil:
      pil.load()
      if pil.mode not in ('L', 'RGB'):
        pil = pil.convert('RGB')  # CMYK JPEGs.
      image = np.asarray(pil)
  except (OSError, ValueError, SyntaxError) as e:
    raise ImageError(f'{path}: truncated or corrupt JPEG ({e})') from None
  return _to_gray(image, path, 'JPEG', JPEG_CHANNEL_TOLERANCE)


# --- DICOM ---------------------------------------------------------------------------


def _decode_dicom(data: bytes, path: str, force: bool) -> np.ndarray:
  import pydicom  # pylint: disable=g-import-not-at-top
  try:
    ds = pydicom.dcmread(io.BytesIO(data), force=force)
  except Exception as e:  # pydicom raises many types for broken headers.
    if isinstance(e, (struct.error, EOFError)):  # It ran out of bytes mid-element.
      raise ImageError(f'{path}: truncated DICOM file: it ends inside an element\'s header '
                       f'({type(e).__name__}: {e})') from None
    raise ImageError(f'{path}: not a readable DICOM file ({type(e).__name__}: {e})') from None
  if 'PixelData' not in ds:
    if PIXEL_DATA_TAG_BYTES in data:
      # pydicom drops an encapsulated Pixel Data element whose end is missing.
      raise ImageError(f'{path}: truncated or corrupt pixel data: the file ends inside '
                       'the Pixel Data element')
    truncated = _truncated_header(ds, data)
    if truncated:
      raise ImageError(f'{path}: truncated DICOM header: {truncated}, before any Pixel Data '
                       '(the file was cut short, e.g. by an interrupted copy)')
    other = [k for k in ('FloatPixelData', 'DoubleFloatPixelData') if k in ds]
    raise ImageError(f'{path}: DICOM file has no integer Pixel Data'
                     + (f' (it has {other[0]}, which is not supported)' if other else
                        ' (its last element is whole, so it was either written without '
                        'an image or cut exactly at an element boundary)'))
  frames = int(ds.get('NumberOfFrames', 1) or 1)
  if frames > 1:
    raise ImageError(f'{path}: multi-frame DICOM ({frames} frames) is not supported; '
                     'export the frame to use as its own file')
  photometric = str(ds.get('PhotometricInterpretation', '')).strip().upper()
  samples = int(ds.get('SamplesPerPixel', 1) or 1)
  if samples != 1 or photometric in ('RGB', 'PALETTE COLOR') or photometric.startswith('YBR'):
    raise ImageError(f'{path}: colour DICOM (Photometric Interpretation {photometric}, '
                     f'{samples} samples per pixel); only MONOCHROME1/MONOCHROME2 X-rays are '
                     'supported')
  if photometric not in ('MONOCHROME1', 'MONOCHROME2'):
    raise ImageError(f'{path}: Photometric Interpretation {photometric or "(missing)"} is not '
                     'supported; expected MONOCHROME1 or MONOCHROME2')
  _require_decoder(ds, path)
  try:
    stored = ds.pixel_array
  except Exception as e:  # Decoder plugins raise their own types for corrupt streams.
    raise ImageError(f'{path}: truncated or corrupt pixel data '
                     f'({_transfer_syntax(ds).name}): {type(e).__name__}: {e}') from None
  if stored.ndim != 2:
    raise ImageError(f'{path}: expected a single 2-D frame, pixel data has shape {stored.shape}')
  return render_dicom(stored, ds, path)


def _truncated_header(ds, data: bytes) -> str:
  """Where a DICOM file was cut inside its header, or '' when its elements are whole.

  pydicom stops quietly at the end of the data, keeping whatever it had parsed, so a
  cut is found by comparing the lengths the elements declare with the bytes present.
  """
  size = len(data)
  meta = getattr(ds, 'file_meta', None)
  meta_end = None
  if data[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + 4] == DICOM_MAGIC:
    group_length = meta.get('FileMetaInformationGroupLength') if meta is not None else None
    if not isinstance(group_length, int) or size < DICOM_MAGIC_OFFSET + 4 + 12:
      return 'the file ends inside its File Meta Information'
    # The group length counts the bytes after its own 12-byte element.
    meta_end = DICOM_MAGIC_OFFSET + 4 + 12 + group_length
    if size < meta_end:
      return (f'the file ends inside its File Meta Information ({size} of its '
              f'{meta_end} bytes)')
  end, last, undefined = meta_end, None, False
  for tag in ds.keys():
    element = ds._dict[tag]  # pylint: disable=protected-access  Raw: its offsets are kept.
    tell, length = getattr(element, 'value_tell', None), getattr(element, 'length', None)
    if tell is None or length is None:
      continue
    if length == 0xFFFFFFFF:  # A sequence of undefined length: its end is not declared.
      undefined = True
      continue
    if tell + length > size:
      return (f'the file ends inside element {tag} ({size - tell} of its {length} value '
              'bytes present)')
    if end is None or tell + length >= end:
      end, last = tell + length, tag
  if end is not None and end < size and not undefined:
    after = f'element {last}' if last is not None else 'the File Meta Information'
    return f'the file ends inside an incomplete element after {after}'
  return ''


def _transfer_syntax(ds):
  from pydicom import uid as uids  # pylint: disable=g-import-not-at-top
  from pydicom.dataset import FileMetaDataset  # pylint: disable=g-import-not-at-top
  if getattr(ds, 'file_meta', None) is None:
    ds.file_meta = FileMetaDataset()
  syntax = ds.file_meta.get('TransferSyntaxUID')
  if syntax is None:
    # A file without a meta header (read with force=True): pydicom knows how it parsed
    # it, and its pixel decoder needs the syntax spelled out.
    implicit, little = ds.original_encoding
    syntax = (uids.ImplicitVRLittleEndian if implicit else
              uids.ExplicitVRLittleEndian if little else uids.ExplicitVRBigEndian)
    ds.file_meta.TransferSyntaxUID = syntax
  return uids.UID(str(syntax))


def _require_decoder(ds, path: str):
  """Raises with the syntax's name and the package to install when pixels cannot decode."""
  from pydicom.pixels import get_decoder  # pylint: disable=g-import-not-at-top
  syntax = _transfer_syntax(ds)
  if not syntax.is_transfer_syntax:
    raise ImageError(f'{path}: unknown transfer syntax {syntax}; not a DICOM transfer '
                     'syntax pydicom knows')
  if not syntax.is_encapsulated:
    return  # Native and deflated syntaxes decode inside pydicom.
  try:
    decoder = get_decoder(syntax)
  except NotImplementedError:
    raise ImageError(
        f'{path}: unsupported transfer syntax {syntax.name} ({syntax}): pydicom has no '
        'decoder for it; convert the file to an uncompressed syntax first (e.g. dcmtk '
        '`dcmdjpeg`/`dcmconv` or `gdcmconv --raw`)') from None
  if not decoder.is_available:
    missing = '; '.join(decoder.missing_dependencies) or 'no plugin is installed'
    raise ImageError(
        f'{path}: unsupported transfer syntax {syntax.name} ({syntax}): no installed '
        f'decoder; pip install one of these pydicom plugins: {missing}')


def render_dicom(stored: np.ndarray, ds, path: str = '<dataset>') -> np.ndarray:
  """Stored pixel values -> uint16 display values (modality LUT, VOI, MONOCHROME1 inverted)."""
  from pydicom.pixels import apply_modality_lut  # pylint: disable=g-import-not-at-top
  values = np.asarray(apply_modality_lut(stored, ds), np.float64)
  if _present(ds, 'WindowCenter') and _present(ds, 'WindowWidth'):
    unit = _window(values, ds, path)
  elif _present(ds, 'VOILUTSequence'):
    unit = _voi_lut(values, ds, path)
  else:
    unit = _stretch(values)
  if str(ds.PhotometricInterpretation).strip().upper() == 'MONOCHROME1':
    unit = 1.0 - unit
  return np.rint(np.clip(unit, 0.0, 1.0) * UINT16_MAX).astype(np.uint16)


def _present(ds, keyword: str) -> bool:
  # Writers often leave optional VOI attributes in the file with an empty value.
  value = ds.get(keyword)
  return value is not None and not (hasattr(value, '__len__') and len(value) == 0)


def _first(value) -> float:
  # Window attributes are often multi-valued (several presets); the first is the default.
  from pydicom.multival import MultiValue  # pylint: disable=g-import-not-at-top
  if isinstance(value, (list, tuple, MultiValue)):
    value = value[0]
  return float(value)


def _window(values: np.ndarray, ds, path: str) -> np.ndarray:
  """DICOM VOI windowing (PS3.3 C.11.2.1.2/C.11.2.1.3) to [0, 1], the output range ymin..ymax."""
  try:
    center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
  except (TypeError, ValueError, IndexError):
    raise ImageError(f'{path}: unreadable Window Center/Width '
                     f'({ds.WindowCenter!r}, {ds.WindowWidth!r})') from None
  function = str(ds.get('VOILUTFunction', 'LINEAR') or 'LINEAR').strip().upper()
  if function == 'LINEAR':
    if width < 1:
      raise ImageError(f'{path}: Window Width {width} is below 1, invalid for a LINEAR window')
    if width == 1:  # The ramp has no width: a threshold at c - 0.5.
      return (values > center - 0.5).astype(np.float64)
    # y = ((x - (c - 0.5)) / (w - 1) + 0.5), clipped to the output range: equal to the
    # standard's three cases (ymin below c - 0.5 - (w-1)/2, ymax above c - 0.5 + (w-1)/2).
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
  if width <= 0:
    raise ImageError(f'{path}: Window Width {width} must be positive for {function}')
  if function == 'LINEAR_EXACT':
    return np.clip((values - center) / width + 0.5, 0.0, 1.0)
  if function == 'SIGMOID':
    return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
  raise ImageError(f'{path}: unknown VOI LUT Function {function!r}; expected LINEAR, '
                   'LINEAR_EXACT or SIGMOID')


def _voi_lut(values: np.ndarray, ds, path: str) -> np.ndarray:
  from pydicom.pixels import apply_voi  # pylint: disable=g-import-not-at-top
  item = ds.VOILUTSequence[0]
  try:
    entries, first_mapped, bits = (int(v) for v in item.LUTDescriptor)
    # LUT entries are indexed by integer modality values; clipping to the LUT's input
    # range first is what the standard asks and keeps pydicom's uint16 indices from
    # wrapping around.
    entries = entries or 2**16
    indices = np.clip(np.rint(values), first_mapped, first_mapped + entries - 1)
    looked_up = np.asarray(apply_voi(indices.astype(np.int64), ds, index=0), np.float64)
  except Exception as e:  # Malformed LUT descriptors/data surface as assorted errors.
    raise ImageError(f'{path}: unusable VOI LUT Sequence ({type(e).__name__}: {e})') from None
  # The descriptor's bit depth is the LUT's output range; some writers understate it.
  top = max(2.0**bits - 1, float(looked_up.max()), 1.0)
  return looked_up / top


def _stretch(values: np.ndarray) -> np.ndarray:
  lo, hi = float(values.min()), float(values.max())
  if hi <= lo:
    return np.zeros_like(values)
  return (values - lo) / (hi - lo)
