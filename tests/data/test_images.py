"""read_image: PNG/JPEG/DICOM decoding, DICOM rendering, and errors that name the file."""

import io
import os
import struct

import cv2
import numpy as np
from PIL import Image
import pydicom
from pydicom import uid as uids
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
import pytest

from cxr_jax.data import images

HEIGHT, WIDTH = 40, 32
RNG = np.random.default_rng(0)


def ramp(bits: int, dtype=np.uint16) -> np.ndarray:
  """A full-range image with structure (a gradient plus noise) and both extremes present."""
  top = 2**bits - 1
  grid = np.add.outer(np.arange(HEIGHT), np.arange(WIDTH)) / (HEIGHT + WIDTH - 2)
  noisy = grid * top + RNG.integers(-top // 20, top // 20 + 1, grid.shape)
  image = np.clip(np.rint(noisy), 0, top)
  image[0, 0], image[-1, -1] = 0, top
  return image.astype(dtype)


# --- PNG and JPEG ----------------------------------------------------------------------


def write_png(path, image):
  assert cv2.imwrite(str(path), image)
  return str(path)


def write_jpeg(path, image):
  Image.fromarray(image).save(str(path), format='JPEG', quality=95)
  return str(path)


@pytest.mark.parametrize('dtype', [np.uint8, np.uint16])
def test_png_gray_keeps_bit_depth_exactly(tmp_path, dtype):
  image = ramp(8 * np.dtype(dtype).itemsize, dtype)
  out = images.read_image(write_png(tmp_path / 'x.png', image))
  assert out.dtype == dtype
  np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize('dtype', [np.uint8, np.uint16])
def test_png_colour_becomes_gray(tmp_path, dtype):
  gray = ramp(8 * np.dtype(dtype).itemsize, dtype)
  colour = np.stack([gray] * 3, axis=-1)  # Equal channels: the gray value is exact.
  out = images.read_image(write_png(tmp_path / 'x.png', colour))
  assert out.dtype == dtype and out.shape == (HEIGHT, WIDTH)
  np.testing.assert_allclose(out.astype(float), gray.astype(float), atol=1)
  rgba = np.concatenate([colour, np.full_like(gray, gray.max())[..., None]], axis=-1)
  out = images.read_image(write_png(tmp_path / 'y.png', rgba))
  np.testing.assert_allclose(out.astype(float), gray.astype(float), atol=1)


@pytest.mark.parametrize('dtype', [np.uint8, np.uint16])
def test_colour_png_is_refused_not_turned_into_gray(tmp_path, dtype):
  # A gray film stored as RGB reads exactly (test above); real colour is not an X-ray.
  gray = ramp(8 * np.dtype(dtype).itemsize, dtype)
  colour = np.stack([gray, gray, gray], axis=-1)
  colour[HEIGHT // 2, WIDTH // 2, 2] ^= 1  # One level in one pixel's channel.
  assert_error(write_png(tmp_path / 'colour.png', colour), 'colour.png', 'a colour PNG',
               'differ by up to 1 levels')


def test_jpeg_gray_and_colour(tmp_path):
  smooth = cv2.GaussianBlur(ramp(8, np.uint8), (5, 5), 2)
  out = images.read_image(write_jpeg(tmp_path / 'x.jpg', smooth))
  assert out.dtype == np.uint8 and out.shape == (HEIGHT, WIDTH)
  assert np.abs(out.astype(int) - smooth).mean() < 3
  out = images.read_image(write_jpeg(tmp_path / 'y.jpeg', np.stack([smooth] * 3, axis=-1)))
  assert out.dtype == np.uint8 and out.shape == (HEIGHT, WIDTH)
  assert np.abs(out.astype(int) - smooth).mean() < 3


def test_colour_jpeg_is_refused(tmp_path):
  smooth = cv2.GaussianBlur(ramp(8, np.uint8), (5, 5), 2)
  red = np.stack([smooth, smooth // 2, smooth // 2], axis=-1)
  assert_error(write_jpeg(tmp_path / 'red.jpg', red), 'red.jpg', 'a colour JPEG')


def test_format_comes_from_content_not_extension(tmp_path):
  image = ramp(8, np.uint8)
  png = write_png(tmp_path / 'x.png', image)
  misnamed = tmp_path / 'x.jpg'
  os.rename(png, misnamed)
  np.testing.assert_array_equal(images.read_image(misnamed), image)


# --- DICOM -----------------------------------------------------------------------------


def make_dicom(pixels: np.ndarray, *, bits_stored: int, photometric='MONOCHROME2',
               **attributes) -> Dataset:
  """A minimal single-frame DX dataset, explicit VR little endian."""
  ds = Dataset()
  ds.file_meta = FileMetaDataset()
  ds.file_meta.MediaStorageSOPClassUID = uids.DigitalXRayImageStorageForPresentation
  ds.file_meta.MediaStorageSOPInstanceUID = uids.generate_uid()
  ds.file_meta.TransferSyntaxUID = uids.ExplicitVRLittleEndian
  ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
  ds.Modality = 'DX'
  ds.Rows, ds.Columns = pixels.shape[:2]
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = photometric
  ds.BitsAllocated = 8 if bits_stored <= 8 else 16
  ds.BitsStored = bits_stored
  ds.HighBit = bits_stored - 1
  signed = np.issubdtype(pixels.dtype, np.signedinteger)
  ds.PixelRepresentation = int(signed)
  storage = {(8, False): np.uint8, (16, False): np.uint16, (16, True): np.int16}
  ds.PixelData = pixels.astype(storage[ds.BitsAllocated, signed]).tobytes()
  for name, value in attributes.items():
    setattr(ds, name, value)
  return ds


def save(ds: Dataset, path) -> str:
  ds.save_as(str(path), enforce_file_format=True)
  return str(path)


def stretched(values: np.ndarray) -> np.ndarray:
  values = values.astype(np.float64)
  return np.rint((values - values.min()) / (values.max() - values.min()) * 65535).astype(np.uint16)


def standard_linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
  """PS3.3 C.11.2.1.2.1 written as its three cases, with ymin 0 and ymax 65535."""
  x = x.astype(np.float64)
  middle = ((x - (center - 0.5)) / (width - 1) + 0.5) * 65535
  y = np.where(x <= center - 0.5 - (width - 1) / 2, 0.0,
               np.where(x > center - 0.5 + (width - 1) / 2, 65535.0, middle))
  return np.rint(y).astype(np.uint16)


@pytest.mark.parametrize('bits', [8, 12, 16])
def test_dicom_without_window_maps_its_range_onto_uint16_losslessly(tmp_path, bits):
  pixels = ramp(bits, np.uint8 if bits == 8 else np.uint16)
  pixels[pixels == pixels.max()] -= 1  # The image does not reach its nominal range.
  out = images.read_image(save(make_dicom(pixels, bits_stored=bits), tmp_path / 'x.dcm'))
  assert out.dtype == np.uint16 and out.shape == (HEIGHT, WIDTH)
  assert out.min() == 0 and out.max() == 65535
  np.testing.assert_array_equal(out, stretched(pixels))
  # Lossless: equal inputs stay equal, distinct inputs stay distinct, order is kept.
  order = np.argsort(pixels.ravel(), kind='stable')
  assert np.all(np.diff(out.ravel()[order].astype(int)) >= 0)
  assert len(np.unique(out)) == len(np.unique(pixels))


@pytest.mark.parametrize('bits', [8, 12, 16])
def test_monochrome1_is_inverted_so_bone_is_bright(tmp_path, bits):
  pixels = ramp(bits, np.uint8 if bits == 8 else np.uint16)
  mono2 = images.read_image(save(make_dicom(pixels, bits_stored=bits), tmp_path / 'a.dcm'))
  mono1 = images.read_image(save(
      make_dicom(pixels, bits_stored=bits, photometric='MONOCHROME1'), tmp_path / 'b.dcm'))
  np.testing.assert_array_equal(mono1, 65535 - mono2)
  # The same with a window: inversion comes after VOI.
  window = dict(WindowCenter=2**(bits - 1), WindowWidth=2**(bits - 1))
  mono2 = images.read_image(save(make_dicom(pixels, bits_stored=bits, **window),
                                 tmp_path / 'c.dcm'))
  mono1 = images.read_image(save(make_dicom(pixels, bits_stored=bits, photometric='MONOCHROME1',
                                            **window), tmp_path / 'd.dcm'))
  np.testing.assert_array_equal(mono1, 65535 - mono2)


@pytest.mark.parametrize('bits,center,width', [(12, 2048, 4096), (12, 1000, 600), (16, 30000, 9),
                                               (8, 100, 2), (8, 128.5, 1)])
def test_linear_window_follows_the_standard(tmp_path, bits, center, width):
  pixels = ramp(bits, np.uint8 if bits == 8 else np.uint16)
  ds = make_dicom(pixels, bits_stored=bits, WindowCenter=center, WindowWidth=width)
  out = images.read_image(save(ds, tmp_path / 'x.dcm'))
  if width == 1:  # The standard's ramp is empty: a threshold at c - 0.5.
    expected = np.where(pixels > center - 0.5, 65535, 0).astype(np.uint16)
  else:
    expected = standard_linear_window(pixels, center, width)
  np.testing.assert_array_equal(out, expected)


def test_empty_window_attributes_count_as_absent(tmp_path):
  pixels = ramp(12)
  ds = make_dicom(pixels, bits_stored=12, WindowCenter='', WindowWidth='')
  np.testing.assert_array_equal(images.read_image(save(ds, tmp_path / 'x.dcm')),
                                stretched(pixels))


def test_first_of_several_windows_is_used(tmp_path):
  pixels = ramp(12)
  ds = make_dicom(pixels, bits_stored=12, WindowCenter=[1500, 2048], WindowWidth=[800, 4096],
                  WindowCenterWidthExplanation=['LUNG', 'FULL'])
  out = images.read_image(save(ds, tmp_path / 'x.dcm'))
  np.testing.assert_array_equal(out, standard_linear_window(pixels, 1500, 800))


def test_rescale_slope_intercept_then_window(tmp_path):
  stored = ramp(12)
  values = stored.astype(np.float64) * 2 - 1024  # Modality LUT: physical values.
  ds = make_dicom(stored, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024,
                  WindowCenter=1000, WindowWidth=3000)
  out = images.read_image(save(ds, tmp_path / 'x.dcm'))
  np.testing.assert_array_equal(out, standard_linear_window(values, 1000, 3000))
  ds = make_dicom(stored, bits_stored=12, RescaleSlope=-1, RescaleIntercept=0)
  out = images.read_image(save(ds, tmp_path / 'y.dcm'))
  np.testing.assert_array_equal(out, stretched(-stored.astype(np.float64)))


def test_signed_pixels_with_rescale(tmp_path):
  stored = (ramp(16).astype(np.int32) - 32768).astype(np.int16)
  ds = make_dicom(stored, bits_stored=16, RescaleSlope=1, RescaleIntercept=100)
  out = images.read_image(save(ds, tmp_path / 'x.dcm'))
  np.testing.assert_array_equal(out, stretched(stored))


def test_linear_exact_and_sigmoid_windows(tmp_path):
  pixels = ramp(12)
  x = pixels.astype(np.float64)
  ds = make_dicom(pixels, bits_stored=12, WindowCenter=2000, WindowWidth=1000,
                  VOILUTFunction='LINEAR_EXACT')
  out = images.read_image(save(ds, tmp_path / 'x.dcm'))
  expected = np.where(x <= 1500, 0, np.where(x > 2500, 65535, ((x - 2000) / 1000 + 0.5) * 65535))
  np.testing.assert_array_equal(out, np.rint(expected).astype(np.uint16))
  ds.VOILUTFunction = 'SIGMOID'
  out = images.read_image(save(ds, tmp_path / 'y.dcm'))
  expected = 65535 / (1 + np.exp(-4 * (x - 2000) / 1000))
  np.testing.assert_array_equal(out, np.rint(expected).astype(np.uint16))


def test_voi_lut_sequence(tmp_path):
  pixels = ramp(12)
  lut = (np.sqrt(np.arange(4096) / 4095) * 1023).astype(np.uint16)  # 10-bit output LUT.
  item = Dataset()
  item.LUTDescriptor = [4096, 0, 10]
  item.add_new('LUTData', 'OW', lut.astype('<u2').tobytes())  # As most writers store it.
  ds = make_dicom(pixels, bits_stored=12)
  ds.VOILUTSequence = [item]
  out = images.read_image(save(ds, tmp_path / 'x.dcm'))
  expected = np.rint(lut[pixels].astype(np.float64) / 1023 * 65535).astype(np.uint16)
  np.testing.assert_array_equal(out, expected)


def test_dicom_without_preamble_is_read_by_extension(tmp_path):
  pixels = ramp(12)
  ds = make_dicom(pixels, bits_stored=12)
  ds.file_meta = FileMetaDataset()
  buffer = io.BytesIO()
  ds.save_as(buffer, enforce_file_format=False, implicit_vr=True, little_endian=True)
  assert buffer.getvalue()[128:132] != b'DICM'  # No preamble: only the name says DICOM.
  path = tmp_path / 'bare.dcm'
  path.write_bytes(buffer.getvalue())
  np.testing.assert_array_equal(images.read_image(path), stretched(pixels))


# --- compressed DICOM ------------------------------------------------------------------


def encode_jpeg_lossless(image: np.ndarray, precision: int) -> bytes:
  """ITU T.81 lossless JPEG (process 14, predictor 1, point transform 0), one component.

  Written here because no installed package encodes it; decoding it with
  pylibjpeg-libjpeg through pydicom is what the test exercises. One Huffman table
  gives every difference category (0..16) a 5-bit code.
  """
  height, width = image.shape
  x = image.astype(np.int64)
  prediction = np.empty_like(x)
  prediction[0, 0] = 1 << (precision - 1)   # H.1.2.1: the first sample of the scan.
  prediction[0, 1:] = x[0, :-1]             # First row: the sample to the left.
  prediction[1:, 0] = x[:-1, 0]             # First column: the sample above.
  prediction[1:, 1:] = x[1:, :-1]           # Elsewhere selection value 1: left.
  diffs = (x - prediction) % 65536          # Differences are modulo 2^16 ...
  diffs = np.where(diffs > 32768, diffs - 65536, diffs)  # ... in -32767..32768.
  bits = []
  for diff in diffs.ravel().tolist():
    category = abs(diff).bit_length()
    bits.append(format(category, '05b'))
    if 0 < category < 16:  # Category 16 (32768) has no extra bits.
      bits.append(format((diff if diff > 0 else diff - 1) & ((1 << category) - 1),
                         f'0{category}b'))
  stream = ''.join(bits)
  stream += '1' * (-len(stream) % 8)  # Pad with 1-bits to a byte boundary.
  entropy = bytearray()
  for i in range(0, len(stream), 8):
    entropy.append(int(stream[i:i + 8], 2))
    if entropy[-1] == 0xFF:
      entropy.append(0)  # Byte stuffing.

  def segment(marker, payload):
    return struct.pack('>BBH', 0xFF, marker, len(payload) + 2) + payload

  frame = struct.pack('>BHHBBBB', precision, height, width, 1, 1, 0x11, 0)
  huffman = bytes([0x00, 0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
  scan = bytes([1, 1, 0x00, 1, 0, 0])  # Component 1, table 0, predictor 1, Se 0, Ah/Al 0.
  return (b'\xff\xd8' + segment(0xC3, frame) + segment(0xC4, huffman) + segment(0xDA, scan)
          + bytes(entropy) + b'\xff\xd9')


def encapsulated(ds: Dataset, frame: bytes, syntax) -> Dataset:
  ds.file_meta.TransferSyntaxUID = syntax
  ds.PixelData = encapsulate([frame])
  ds['PixelData'].VR = 'OB'
  return ds


@pytest.mark.parametrize('bits,photometric', [(8, 'MONOCHROME2'), (12, 'MONOCHROME1'),
                                              (16, 'MONOCHROME2')])
def test_rle_equals_uncompressed(tmp_path, bits, photometric):
  pixels = ramp(bits, np.uint8 if bits == 8 else np.uint16)
  ds = make_dicom(pixels, bits_stored=bits, photometric=photometric)
  plain = images.read_image(save(ds, tmp_path / 'plain.dcm'))
  ds.compress(uids.RLELossless, encoding_plugin='pydicom')
  rle = images.read_image(save(ds, tmp_path / 'rle.dcm'))
  np.testing.assert_array_equal(rle, plain)


@pytest.mark.parametrize('bits', [8, 12, 16])
def test_jpeg_lossless_equals_uncompressed(tmp_path, bits):
  pixels = ramp(bits, np.uint8 if bits == 8 else np.uint16)
  window = dict(WindowCenter=2**(bits - 1), WindowWidth=2**bits)
  plain = images.read_image(save(make_dicom(pixels, bits_stored=bits, **window),
                                 tmp_path / 'plain.dcm'))
  for syntax in (uids.JPEGLosslessSV1, uids.JPEGLossless):
    ds = encapsulated(make_dicom(pixels, bits_stored=bits, **window),
                      encode_jpeg_lossless(pixels, bits), syntax)
    np.testing.assert_array_equal(images.read_image(save(ds, tmp_path / 'jpeg.dcm')), plain)


def test_jpeg_baseline_dicom(tmp_path):
  pixels = cv2.GaussianBlur(ramp(8, np.uint8), (5, 5), 2)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='JPEG', quality=95)
  ds = encapsulated(make_dicom(pixels, bits_stored=8, WindowCenter=128, WindowWidth=256),
                    buffer.getvalue(), uids.JPEGBaseline8Bit)
  out = images.read_image(save(ds, tmp_path / 'x.dcm'))
  expected = standard_linear_window(pixels, 128, 256)
  assert out.dtype == np.uint16 and out.shape == (HEIGHT, WIDTH)
  assert np.abs(out.astype(float) - expected).mean() < 3 * 257


def test_jpeg2000_lossless_equals_uncompressed(tmp_path):
  pixels = ramp(12)
  ds = make_dicom(pixels, bits_stored=12)
  plain = images.read_image(save(ds, tmp_path / 'plain.dcm'))
  ds.compress(uids.JPEG2000Lossless)
  np.testing.assert_array_equal(images.read_image(save(ds, tmp_path / 'j2k.dcm')), plain)


def pydicom_test_file(name: str) -> str:
  # Files that ship inside the pydicom wheel (not fetched from the network).
  path = os.path.join(os.path.dirname(pydicom.__file__), 'data', 'test_files', name)
  assert os.path.exists(path), f'{name} is not in this pydicom installation ({path})'
  return path


def test_jpeg_ls_and_other_syntaxes_from_pydicom_test_files():
  # JPEG-LS has no encoder installed; pydicom's own files give real encoder output.
  reference = images.read_image(pydicom_test_file('MR_small.dcm'))
  for name in ('MR_small_jpeg_ls_lossless.dcm', 'MR_small_RLE.dcm', 'MR_small_jp2klossless.dcm'):
    np.testing.assert_array_equal(images.read_image(pydicom_test_file(name)), reference, name)
  extended = images.read_image(pydicom_test_file('JPGExtended.dcm'))  # 12-bit lossy JPEG.
  assert extended.dtype == np.uint16 and extended.shape == (1024, 256)


# --- errors ----------------------------------------------------------------------------


def assert_error(path, *reason_words):
  with pytest.raises(images.ImageError) as error:
    images.read_image(path)
  message = str(error.value)
  assert str(path) in message
  for word in reason_words:
    assert word.lower() in message.lower(), message
  assert isinstance(error.value, ValueError)
  return message


def test_missing_and_empty_files(tmp_path):
  assert_error(tmp_path / 'nope.png', 'not found')
  empty = tmp_path / 'empty.dcm'
  empty.write_bytes(b'')
  assert_error(empty, 'empty')


def test_unknown_format(tmp_path):
  path = tmp_path / 'notes.txt'
  path.write_text('not an image')
  assert_error(path, 'unknown image format')


@pytest.mark.parametrize('cut', [0.5, 0.9])
def test_truncated_png_and_jpeg(tmp_path, cut):
  png = write_png(tmp_path / 'x.png', ramp(16))
  data = open(png, 'rb').read()
  open(png, 'wb').write(data[:int(len(data) * cut)])
  assert_error(png, 'truncated or corrupt png')
  jpeg = write_jpeg(tmp_path / 'x.jpg', ramp(8, np.uint8))
  data = open(jpeg, 'rb').read()
  open(jpeg, 'wb').write(data[:int(len(data) * cut)])
  assert_error(jpeg, 'truncated or corrupt jpeg')


def test_corrupt_png_and_jpeg(tmp_path):
  png = write_png(tmp_path / 'x.png', ramp(8, np.uint8))
  data = bytearray(open(png, 'rb').read())
  data[60:80] = bytes(20)  # Inside the image data: the chunk CRC no longer matches.
  open(png, 'wb').write(bytes(data))
  assert_error(png, 'corrupt')
  jpeg = write_jpeg(tmp_path / 'x.jpg', ramp(8, np.uint8))
  data = bytearray(open(jpeg, 'rb').read())
  data[3:40] = b'\xff' * 37  # The headers after SOI.
  open(jpeg, 'wb').write(bytes(data))
  assert_error(jpeg, 'corrupt')


@pytest.mark.filterwarnings('ignore:End of file reached before delimiter')
def test_truncated_dicom(tmp_path):
  path = save(make_dicom(ramp(12), bits_stored=12), tmp_path / 'x.dcm')
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:-200])
  assert_error(path, 'truncated or corrupt pixel data')
  ds = make_dicom(ramp(12), bits_stored=12)
  ds.compress(uids.RLELossless, encoding_plugin='pydicom')
  path = save(ds, tmp_path / 'rle.dcm')
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:-300])
  assert_error(path, 'truncated or corrupt pixel data', 'RLE')
  header_only = tmp_path / 'header.dcm'
  header_only.write_bytes(data[:200])
  assert_error(header_only, 'dicom')


@pytest.mark.filterwarnings('ignore:Invalid value for VR')
def test_dicom_cut_inside_its_header_says_the_header_is_truncated(tmp_path):
  data = open(save(make_dicom(ramp(12), bits_stored=12, PatientName='Doe^Jane',
                              WindowCenter=2048, WindowWidth=4096), tmp_path / 'x.dcm'),
              'rb').read()
  pixels_at = data.index(images.PIXEL_DATA_TAG_BYTES)
  meta_end = data.index(b'\x08\x00')  # The first element after the meta group (0008,....).
  rng = np.random.default_rng(9)
  # Inside the meta information, inside a data element's value, and inside Pixel Data's
  # tag (a cut after it is inside the Pixel Data element: test_truncated_dicom).
  cuts = [150, int(rng.integers(meta_end + 10, pixels_at - 20)), pixels_at - 3,
          pixels_at + 2]
  for cut in cuts:
    path = tmp_path / f'cut_{cut}.dcm'
    path.write_bytes(data[:cut])
    message = assert_error(path, 'truncated DICOM')
    assert 'no integer Pixel Data' not in message, (cut, message)


def test_corrupt_compressed_dicom(tmp_path):
  pixels = ramp(12)
  frame = bytearray(encode_jpeg_lossless(pixels, 12))
  frame[2:20] = b'\x00' * 18  # Break the frame header.
  ds = encapsulated(make_dicom(pixels, bits_stored=12), bytes(frame), uids.JPEGLosslessSV1)
  assert_error(save(ds, tmp_path / 'x.dcm'), 'corrupt pixel data', 'JPEG Lossless')


def test_unsupported_transfer_syntax_is_named(tmp_path):
  pixels = ramp(8, np.uint8)
  mpeg2 = '1.2.840.10008.1.2.4.100'
  ds = encapsulated(make_dicom(pixels, bits_stored=8), b'\x00\x00\x01\xb3' + bytes(60), mpeg2)
  message = assert_error(save(ds, tmp_path / 'video.dcm'), 'unsupported transfer syntax',
                         'MPEG2', mpeg2)
  assert 'no decoder' in message


def test_missing_plugin_names_the_package(tmp_path, monkeypatch):
  from pydicom.pixels import get_decoder
  decoder = get_decoder(uids.JPEGLSLossless)
  # As if pylibjpeg-libjpeg were not installed: pydicom then lists what would decode it.
  monkeypatch.setattr(decoder, '_available', {})
  monkeypatch.setitem(decoder._unavailable, 'pylibjpeg', ('pylibjpeg', 'pylibjpeg-libjpeg'))
  ds = encapsulated(make_dicom(ramp(12), bits_stored=12), b'\xff\xd8\xff\xf7' + bytes(40),
                    uids.JPEGLSLossless)
  assert_error(save(ds, tmp_path / 'x.dcm'), 'unsupported transfer syntax', 'JPEG-LS',
               'pylibjpeg-libjpeg')


def test_multiframe_colour_and_pixelless_dicom(tmp_path):
  frames = np.stack([ramp(12)] * 2)
  ds = make_dicom(frames[0], bits_stored=12, NumberOfFrames=2)
  ds.PixelData = frames.tobytes()
  assert_error(save(ds, tmp_path / 'multi.dcm'), 'multi-frame', '2 frames')
  rgb = np.stack([ramp(8, np.uint8)] * 3, axis=-1)
  ds = make_dicom(rgb[..., 0], bits_stored=8, photometric='RGB', SamplesPerPixel=3,
                  PlanarConfiguration=0)
  ds.PixelData = rgb.tobytes()
  assert_error(save(ds, tmp_path / 'rgb.dcm'), 'colour', 'RGB')
  ds = make_dicom(ramp(12), bits_stored=12)
  del ds.PixelData
  assert_error(save(ds, tmp_path / 'nopixels.dcm'), 'no integer pixel data')


def test_invalid_window_width(tmp_path):
  ds = make_dicom(ramp(12), bits_stored=12, WindowCenter=100, WindowWidth=0)
  assert_error(save(ds, tmp_path / 'x.dcm'), 'window width')
