"""DICOM series reading and DICOM-SEG writing: the real CT series plus small series made here with pydicom."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from conftest import shared_path
from SAMSelfPromptLib.errors import InputError
from SAMSelfPromptLib.io import list_dicom_series, read_any, read_dicom_series, read_image, write_dicom_seg

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _dataset(sop_class: str = CTImageStorage, **attrs) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.StudyID = "Test^Phantom", "P1", "1"
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def make_series(folder: Path, n: int = 5, rows: int = 6, cols: int = 7, step: float = 2.5,
                iop=(1, 0, 0, 0, 1, 0), origin=(10.0, -20.0, 30.0), pixel_spacing=(0.8, 0.6),
                series_uid: str | None = None, study_uid: str | None = None, slope: float = 1.0,
                intercept: float = -1024.0, depths=None, description: str = "synthetic", prefix: str = "IM") -> list[Path]:
    """A single-frame CT series; slice k holds value 100*k + pixel index so order errors show.

    Files are named in reverse slice order on purpose.
    """
    folder.mkdir(parents=True, exist_ok=True)
    iop = np.asarray(iop, float)
    normal = np.cross(iop[:3], iop[3:])
    depths = [k * step for k in range(n)] if depths is None else depths
    series_uid, study_uid = series_uid or generate_uid(), study_uid or generate_uid()
    frame_uid = generate_uid()
    paths = []
    for k, d in enumerate(depths):
        pixels = (100 * k + np.arange(rows * cols).reshape(rows, cols)).astype(np.uint16)
        ds = _dataset(Modality="CT", SeriesInstanceUID=series_uid, StudyInstanceUID=study_uid,
                      FrameOfReferenceUID=frame_uid, SeriesDescription=description, SeriesNumber=1,
                      InstanceNumber=k + 1, ImageOrientationPatient=[float(v) for v in iop],
                      ImagePositionPatient=[float(v) for v in np.asarray(origin) + d * normal],
                      PixelSpacing=list(pixel_spacing), SliceThickness=step, Rows=rows, Columns=cols,
                      SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2", BitsAllocated=16,
                      BitsStored=16, HighBit=15, PixelRepresentation=0, RescaleSlope=slope,
                      RescaleIntercept=intercept, PixelData=pixels.tobytes())
        path = folder / f"{prefix}{len(depths) - k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# --- the real CT series -------------------------------------------------------------------------------------


def test_real_series_matches_nifti_conversion(ct_dicom_dir: Path) -> None:
    volume = read_dicom_series(ct_dicom_dir)
    reference = read_image(shared_path("ct_totalseg", "ct.nii.gz"))
    assert volume.array.shape == (20, 512, 512) and volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_allclose(volume.ijk_to_ras, reference.ijk_to_ras, atol=1e-3)
    assert volume.modality == "CT"
    # Slice order comes from positions: ascending z, while the file names run the other way.
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in volume.source_files]
    assert z == sorted(z) and volume.source_files == sorted(volume.source_files, reverse=True)
    assert volume.spacing == pytest.approx([0.9765625, 0.9765625, 2.0])  # measured, not SliceThickness 3


def test_real_series_listing(ct_dicom_dir: Path) -> None:
    (summary,) = list_dicom_series(ct_dicom_dir)
    assert summary["uid"] == "" and summary["id"] == "unnamed-1"  # the sample's SeriesInstanceUID is empty
    assert summary["modality"] == "CT" and summary["num_files"] == 20
    assert summary["folders"] == [str(ct_dicom_dir)]
    assert read_dicom_series(ct_dicom_dir, "unnamed-1").array.shape == (20, 512, 512)


# --- synthetic series: geometry ------------------------------------------------------------------------------


def test_oblique_series_geometry_order_and_rescale(tmp_path: Path) -> None:
    c, s = np.cos(0.3), np.sin(0.3)
    iop = (c, s, 0.0, 0.0, 0.0, -1.0)  # rows tilted in the axial plane, columns running inferior
    paths = make_series(tmp_path / "nested" / "deeper", iop=iop, slope=2.0, intercept=-1000.0)
    (tmp_path / "README.txt").write_text("not DICOM")
    volume = read_dicom_series(tmp_path)
    assert volume.array.shape == (5, 6, 7)
    raw = np.arange(42).reshape(6, 7)
    for k in range(5):  # slice k was written with value 100*k: order by position, not name
        np.testing.assert_array_equal(volume.array[k], 2 * (100 * k + raw) - 1000)
    assert volume.source_files == [str(p) for p in paths]
    row, col = np.array(iop[:3]), np.array(iop[3:])
    expected = np.eye(4)
    expected[:3, 0], expected[:3, 1] = row * 0.6, col * 0.8
    expected[:3, 2], expected[:3, 3] = np.cross(row, col) * 2.5, (10.0, -20.0, 30.0)
    np.testing.assert_allclose(volume.ijk_to_ras, LPS_TO_RAS @ expected, atol=1e-6)


def test_float_rescale_gives_float_volume(tmp_path: Path) -> None:
    make_series(tmp_path, slope=0.5, intercept=0.25)
    volume = read_dicom_series(tmp_path)
    assert volume.array.dtype == np.float32
    assert volume.array[1, 0, 1] == pytest.approx(0.5 * 101 + 0.25)


def test_read_any_folder_and_single_file(tmp_path: Path) -> None:
    paths = make_series(tmp_path / "a", n=3)
    make_series(tmp_path / "b", n=4)
    assert read_any(tmp_path).array.shape[0] == 4  # the largest series
    assert read_any(paths[0]).array.shape[0] == 3  # the series this file belongs to


# --- synthetic series: one error per way a folder can be wrong -----------------------------------------------


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no DICOM files"):
        read_dicom_series(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="no DICOM files"):
        read_dicom_series(tmp_path)
    with pytest.raises(InputError, match="not found"):
        read_dicom_series(tmp_path / "missing")


def test_only_non_image_dicom(tmp_path: Path) -> None:
    sr = _dataset("1.2.840.10008.5.1.4.1.1.88.33", Modality="SR", SeriesInstanceUID=generate_uid())
    sr.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    with pytest.raises(InputError, match="only non-image DICOM.*Comprehensive SR"):
        read_dicom_series(tmp_path)


def test_two_series_largest_by_default_and_selection(tmp_path: Path) -> None:
    make_series(tmp_path / "s1", n=3, series_uid="1.2.3.1", description="small")
    make_series(tmp_path / "s2", n=6, series_uid="1.2.3.2", description="large")
    sr = _dataset("1.2.840.10008.5.1.4.1.1.88.33", Modality="SR", SeriesInstanceUID="1.2.3.3")
    sr.save_as(tmp_path / "s2" / "report.dcm", enforce_file_format=True)  # ignored beside images
    listing = list_dicom_series(tmp_path)
    assert [(s["uid"], s["num_files"], s["description"]) for s in listing] == [("1.2.3.2", 6, "large"),
                                                                               ("1.2.3.1", 3, "small")]
    assert listing[1]["folders"] == [str(tmp_path / "s1")]
    assert read_dicom_series(tmp_path).array.shape[0] == 6
    assert read_dicom_series(tmp_path, "1.2.3.1").array.shape[0] == 3
    with pytest.raises(InputError, match=r"'9\.9' not found.*1\.2\.3\.2.*6 files.*1\.2\.3\.1"):
        read_dicom_series(tmp_path, "9.9")


def test_missing_slices_name_the_gap(tmp_path: Path) -> None:
    make_series(tmp_path, depths=[0.0, 2.0, 4.0, 10.0, 12.0])
    with pytest.raises(InputError, match=r"missing slices.*2 mm.*34\.00->40\.00 mm"):
        read_dicom_series(tmp_path)


def test_repeated_positions_are_4d(tmp_path: Path) -> None:
    make_series(tmp_path, depths=[0.0, 2.0, 4.0, 0.0, 2.0, 4.0])
    with pytest.raises(InputError, match="4D"):
        read_dicom_series(tmp_path)


def test_multiframe_refused(tmp_path: Path) -> None:
    make_series(tmp_path, n=3)
    ds = pydicom.dcmread(next(tmp_path.iterdir()))
    ds.NumberOfFrames = 3
    ds.PixelData = ds.PixelData * 3
    ds.save_as(tmp_path / "multi.dcm")
    with pytest.raises(InputError, match="multi-frame"):
        read_dicom_series(tmp_path)


def test_mixed_sizes_within_series(tmp_path: Path) -> None:
    make_series(tmp_path / "a", n=3, series_uid="1.2.3", rows=6)
    make_series(tmp_path / "b", n=3, series_uid="1.2.3", rows=8, prefix="X")
    with pytest.raises(InputError, match=r"mixed Rows \[6, 8\]"):
        read_dicom_series(tmp_path)


def test_mixed_orientation_within_series(tmp_path: Path) -> None:
    make_series(tmp_path / "a", n=3, series_uid="1.2.3")
    make_series(tmp_path / "b", n=3, series_uid="1.2.3", iop=(1, 0, 0, 0, 0, -1), prefix="X")
    with pytest.raises(InputError, match="mixed ImageOrientationPatient"):
        read_dicom_series(tmp_path)


def test_rgb_series_refused(tmp_path: Path) -> None:
    make_series(tmp_path, n=2, rows=4, cols=4)
    for path in tmp_path.iterdir():
        ds = pydicom.dcmread(path)
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = np.zeros((4, 4, 3), np.uint8).tobytes()
        ds.save_as(path)
    with pytest.raises(InputError, match="colour"):
        read_dicom_series(tmp_path)


def test_images_without_position_refused(tmp_path: Path) -> None:
    for path in make_series(tmp_path, n=3):
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient
        ds.save_as(path)
    with pytest.raises(InputError, match="without ImagePositionPatient"):
        read_dicom_series(tmp_path)


def test_single_rgb_image(tmp_path: Path) -> None:
    (path,) = make_series(tmp_path, n=1, rows=4, cols=5)
    rgb = np.random.default_rng(1).integers(0, 255, (4, 5, 3), dtype=np.uint8)
    ds = pydicom.dcmread(path)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    del ds.RescaleSlope, ds.RescaleIntercept
    ds.PixelData = rgb.tobytes()
    ds.save_as(path)
    volume = read_dicom_series(tmp_path)
    assert volume.is_rgb and volume.modality == "RGB" and volume.array.shape == (1, 4, 5, 3)
    np.testing.assert_array_equal(volume.array[0], rgb)


# --- DICOM-SEG -----------------------------------------------------------------------------------------------


def _dciodvfy(path: Path) -> list[str]:
    """dciodvfy's error lines; its warnings are printed for the record."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (out.stdout + out.stderr).splitlines()
    print("\n".join(line for line in lines if line.startswith("Warning")))
    return [line for line in lines if line.startswith("Error")]


def test_dicom_seg_of_real_labels_reads_back_and_validates(ct_dicom_dir: Path, tmp_path: Path) -> None:
    import highdicom as hd

    volume = read_dicom_series(ct_dicom_dir)
    labels = read_image(shared_path("ct_totalseg", "labels.nii.gz")).array
    labelmap = np.where(labels == 5, 1, np.where(labels == 1, 2, 0)).astype(np.uint8)  # liver, spleen
    assert (labelmap == 1).sum() > 1000 and (labelmap == 2).sum() > 100
    out = write_dicom_seg(tmp_path / "seg.dcm", labelmap, list(reversed(volume.source_files)),
                          [{"label": 1, "name": "Liver", "color": (0.8, 0.4, 0.3)}, {"label": 2, "name": "Spleen"}])
    assert _dciodvfy(out) == []

    seg = hd.seg.segread(out)
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["Liver", "Spleen"]
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "SAMSelfPrompt"
    assert seg.SegmentationType == "BINARY"
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID)
            for f in volume.source_files]
    referenced = {str(i.ReferencedSOPInstanceUID)
                  for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(uids)  # every source instance, by its real UID
    frames_expected = sum(int((labelmap[k] == v).any()) for k in range(20) for v in (1, 2))
    assert seg.NumberOfFrames == frames_expected  # empty frames omitted
    pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
    np.testing.assert_array_equal(pixels, labelmap)  # per slice, in the reader's k order


def test_dicom_seg_keeps_source_uids_and_checks_shape(tmp_path: Path) -> None:
    import highdicom as hd

    make_series(tmp_path / "src", n=4, series_uid="1.2.826.0.1.3680043.8.498.1", study_uid="1.2.826.0.1.3680043.8.498.2")
    volume = read_dicom_series(tmp_path / "src")
    labelmap = np.zeros(volume.shape_kji, np.uint8)
    labelmap[1:3, 2:4, 1:5] = 3
    out = write_dicom_seg(tmp_path / "seg.dcm", labelmap, volume.source_files, [{"label": 3, "name": "Lesion"}])
    assert _dciodvfy(out) == []
    seg = hd.seg.segread(out)
    assert seg.StudyInstanceUID == "1.2.826.0.1.3680043.8.498.2" and seg.PatientID == "P1"
    assert seg.SeriesInstanceUID != "1.2.826.0.1.3680043.8.498.1"
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["Lesion"]
    with pytest.raises(FileExistsError):
        write_dicom_seg(out, labelmap, volume.source_files)
    with pytest.raises(InputError, match="does not match the source series"):
        write_dicom_seg(tmp_path / "bad.dcm", labelmap[:, :, :3], volume.source_files)
    with pytest.raises(InputError, match="empty"):
        write_dicom_seg(tmp_path / "empty.dcm", np.zeros_like(labelmap), volume.source_files)
    assert not (tmp_path / "bad.dcm").exists() and not (tmp_path / "empty.dcm").exists()
