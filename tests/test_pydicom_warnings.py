"""pydicom's UserWarnings are handled inside nvfm/dicom.py (issue 24 item 3): header-value
warnings are silenced, pixel-decoding warnings become one fixed, PHI-free note per series in
preprocess.py's log, and nothing of pydicom's text reaches the console or the log, in the main
process and in worker processes alike. Each case is first shown to warn under plain pydicom."""
import glob
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import RLELossless

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from dicom_synth import head_phantom, mutate_series, write_series  # noqa: E402

import preprocess  # noqa: E402
from nvfm import dicom  # noqa: E402
from nvfm.data import ShardReader  # noqa: E402

FRAMES_NOTE = "pixel data: frame count differs from Number of Frames (as many frames read as the header says)"


def _pydicom_warnings(caught):
    return [w for w in caught if issubclass(w.category, UserWarning) and os.sep + "pydicom" + os.sep in w.filename]


@pytest.mark.parametrize("message,phrase", [
    ("Invalid value for VR IS: '1A'. Please see <https://dicom.nema.org/...>", None),
    ("Value 'DOE^JOHN' is not valid for VR PN", None),
    ("The value length (70) exceeds the maximum length of 64 allowed for VR LO.", None),
    ("Expected explicit VR, but found implicit VR - using implicit VR for reading", None),
    ("Unknown encoding 'ISO_IR 999' - using default encoding instead", None),
    ("The decoding plugin has changed from 'gdcm' to 'pylibjpeg' during the decoding process", None),
    ("2 frames have been found in the encapsulated pixel data, which is larger than the given (0028,0008) "
     "'Number of Frames' value of 1. The returned data will include these extra frames", FRAMES_NOTE),
    ("The pixel data is 1026 bytes long, which indicates it contains 2 bytes of excess padding to be removed",
     "pixel data: longer than Rows x Columns x frames needs (padding ignored)"),
    ("The (0028,0004) 'Photometric Interpretation' value is 'YBR_FULL_422' however the encoded image's "
     "codestream uses component IDs that indicate it should be 'RGB'",
     "pixel data: Photometric Interpretation corrected from the codestream"),
    ("Something new about DOE^JOHN's pixels", dicom.PIXEL_PHRASE_OTHER),
])
def test_pixel_phrase_is_fixed_text(message, phrase):
    got = dicom.pixel_phrase(message)
    assert got == phrase
    assert got is None or ("DOE" not in got and "'" not in got)  # never quotes the message


def test_header_warnings_are_silenced(tmp_path, caplog):
    """pydicom-data files that warn on their headers: scanning them leaks no warning or log record."""
    names = ("badVR.dcm", "SC_rgb_jpeg.dcm")
    for n in names:
        shutil.copy(get_testdata_file(n), tmp_path / n)
    raw = []
    for n in names:  # plain pydicom warns on each (so this test can fail)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(str(tmp_path / n), stop_before_pixels=True)
            for el in ds:
                el.value
        raw.append(len(_pydicom_warnings(caught)))
    assert all(raw), raw
    assert [r for r in caplog.records if r.name == "pydicom"]  # plain pydicom also logs them
    caplog.clear()
    caplog.set_level("DEBUG", logger="pydicom")
    for quick in (True, False):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            old, dicom.FAST_SCAN = dicom.FAST_SCAN, quick
            try:
                infos = [dicom.scan_dicom(str(tmp_path), n) for n in names]
            finally:
                dicom.FAST_SCAN = old
        assert not _pydicom_warnings(caught), [str(w.message) for w in caught]
        assert all(i.get("study_uid") and "error" not in i for i in infos), infos
    assert not [r for r in caplog.records if r.name.startswith("pydicom") and r.levelname == "WARNING"]
    # a warning from other code is not swallowed
    with pytest.warns(RuntimeWarning, match="not pydicom's"):
        with dicom.pydicom_quiet():
            warnings.warn("not pydicom's", RuntimeWarning)


def _extra_frame(ds, i):
    """Each file's RLE pixel data holds two frames while the header says one."""
    arr = ds.pixel_array
    ds.NumberOfFrames = 2
    ds.compress(RLELossless, np.stack([arr, arr[::-1]]))
    ds.NumberOfFrames = 1


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    root = tmp_path_factory.mktemp("pixwarn")
    vol = head_phantom((8, 96, 80), 3)
    write_series(str(root / "in" / "clean" / "ct"), vol, compress=True, seed=1)
    write_series(str(root / "in" / "extra" / "ct"), vol, compress=True, seed=1)
    mutate_series(str(root / "in" / "extra" / "ct"), _extra_frame)
    f = sorted(glob.glob(str(root / "in" / "extra" / "ct" / "*.dcm")))[0]
    with warnings.catch_warnings(record=True) as caught:  # plain pydicom warns (so the tests can fail)
        warnings.simplefilter("always")
        assert pydicom.dcmread(f).pixel_array.shape == (2, 96, 80)
    assert any("frames have been found" in str(w.message) for w in _pydicom_warnings(caught))
    return root


def test_pixel_warning_is_one_note_per_series(series, tmp_path, capsys):
    out = str(tmp_path / "out")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        man = preprocess.run(str(series / "in"), out, n_workers=0, cfg_progress=False)
    assert not _pydicom_warnings(caught), [str(w.message) for w in caught]
    err = capsys.readouterr().err
    assert err.count(FRAMES_NOTE) == 1, err  # one note for the series, not one per file or per frame
    assert "frames have been found" not in err and "UserWarning" not in err
    with open(os.path.join(out, "preprocess.log")) as f:
        log = f.read()
    assert log.count(FRAMES_NOTE) == 1 and "frames have been found" not in log
    # the header's frame is the one read: the volume equals the clean series'
    r = ShardReader(out)
    assert len(r) == 2 and man["summary"]["volumes"] == 2
    a, b = (np.asarray(r.volume(i)[0]) for i in range(2))
    np.testing.assert_array_equal(a, b)


def test_worker_processes_leak_nothing(series, tmp_path):
    env = dict(os.environ, NVFM_QUIET="1", PYTHONPATH=ROOT, PYTHONWARNINGS="always")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "preprocess.py"), f"--input={series / 'in'}",
                        f"--output={tmp_path / 'out'}", "--workers=2", "--progress=False"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Warning" not in p.stderr and "frames have been found" not in p.stderr, p.stderr
    assert p.stderr.count(FRAMES_NOTE) == 1, p.stderr
