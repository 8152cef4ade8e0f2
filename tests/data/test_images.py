import numpy as np
import pytest
from PIL import Image

from biogen.data.images import read_image_folder, save_grid
from biogen.data.phantoms import brain_phantoms


def test_phantoms_range_labels_and_seed():
    a, la = brain_phantoms(20, size=64, seed=3)
    b, lb = brain_phantoms(20, size=64, seed=3)
    assert a.shape == (20, 1, 64, 64) and a.dtype == np.float32
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert a.min() >= -1 and a.max() <= 1
    assert set(np.unique(la)) == {0, 1}
    # a tumour adds bright tissue inside the brain: more pixels above the brain's usual intensity
    bright = (a > 0.5).mean(axis=(1, 2, 3))
    assert bright[la == 1].mean() > bright[la == 0].mean()


def test_read_folder_classes_conversion_and_skips(tmp_path):
    for cls in ("none", "tumour"):
        (tmp_path / cls).mkdir()
    Image.fromarray(np.full((40, 30), 200, np.uint8)).save(tmp_path / "none" / "a.png")
    Image.fromarray((np.zeros((50, 50, 3)) + [255, 0, 0]).astype(np.uint8)).save(tmp_path / "tumour" / "b.jpg")
    (tmp_path / "tumour" / "broken.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        f = read_image_folder(tmp_path, size=32)
    assert f.images.shape == (2, 1, 32, 32)
    assert f.classes == ["none", "tumour"] and list(f.labels) == [0, 1]
    assert [p.name for p, _ in f.skipped] == ["broken.png"]
    assert any("converted to grayscale" in n for n in f.notes)
    assert f.images[0].mean() == pytest.approx(200 / 255 * 2 - 1, abs=1e-2)


def test_read_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_image_folder(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a" / "x.png")
    with pytest.raises(ValueError, match="class folder.*no image files.*b"):
        read_image_folder(tmp_path)


def test_dicom_is_read(tmp_path):
    pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(tmp_path / "x.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    arr = np.tile(np.arange(16, dtype=np.uint16) * 100, (16, 1))
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = arr.tobytes()
    ds.save_as(str(tmp_path / "x.dcm"), enforce_file_format=True)
    f = read_image_folder(tmp_path, size=16)
    assert f.images.shape == (1, 1, 16, 16)
    assert f.images[0, 0, 0, 0] == pytest.approx(-1) and f.images[0, 0, 0, -1] == pytest.approx(1)


def test_save_grid_writes_png(tmp_path):
    imgs, _ = brain_phantoms(5, size=16)
    p = save_grid(imgs, tmp_path / "g.png", nrow=3)
    with Image.open(p) as im:
        assert im.size == (3 * 18 + 2, 2 * 18 + 2)
