"""A first-run check of an installation: `python -m nvfm.doctor`.

Prints, one line each: Python; torch and the CUDA it was built for; GPUs (count and memory); the
compiled extension (built or not, and why not; stale when a csrc/ source changed after the build;
CUDA kernels that impl='auto' does not run yet); the optional packages present and missing (with
what each is for); the Debian data the project reads (mricron-data templates, dcm2niix on PATH,
WordNet for METEOR). Reports only: it changes nothing and always exits 0.
"""
import glob
import importlib
import os
import shutil
import sys

# (import name, distribution name, what needs it)
OPTIONAL = (
    ("pydicom", "pydicom", "preprocess.py: reading DICOM"),
    ("nibabel", "nibabel", "NIfTI input, phantom templates"),
    ("pylibjpeg", "pylibjpeg", "compressed DICOM (JPEG family)"),
    ("libjpeg", "pylibjpeg-libjpeg", "JPEG / JPEG-LS DICOM"),
    ("openjpeg", "pylibjpeg-openjpeg", "JPEG 2000 DICOM"),
    ("rle", "pylibjpeg-rle", "RLE DICOM"),
    ("nilearn", "nilearn", "phantom anatomy when mricron-data is missing"),
    ("transformers", "transformers", "train_llava.py: report generator"),
    ("sacrebleu", "sacrebleu", "report metrics: BLEU"),
    ("rouge_score", "rouge-score", "report metrics: ROUGE-L"),
    ("nltk", "nltk", "report metrics: METEOR"),
)


def _version(module, dist):
    try:
        from importlib import metadata
        return metadata.version(dist)
    except Exception:
        return str(getattr(module, "__version__", "?"))


def packages():
    """([(distribution, version)], [(distribution, what needs it, error)]): each optional package
    imported for real (present means importable)."""
    present, missing = [], []
    for mod, dist, what in OPTIONAL:
        try:
            m = importlib.import_module(mod)
        except Exception as e:  # not installed, or installed but broken: either way not usable
            missing.append((dist, what, (str(e).splitlines() or [type(e).__name__])[0]))
            continue
        present.append((dist, _version(m, dist)))
    return present, missing


def _gib(n):
    return f"{n / 2**30:.1f} GiB"


def torch_lines():
    import torch
    cuda = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build, no CUDA"
    lines = [f"torch: {torch.__version__} ({cuda})"]
    try:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception as e:
        return lines + [f"gpu: 0 (CUDA not usable: {e})"]
    if n == 0 and not torch.version.cuda:
        lines.append("gpu: 0 (this torch cannot use one)")
    elif n == 0:  # a CUDA build that sees no device: say where to look
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
        lines.append(f"gpu: 0 (torch built for CUDA {torch.version.cuda} sees none: no NVIDIA driver or device"
                     + (f", or CUDA_VISIBLE_DEVICES={hidden!r} hides them)" if hidden is not None else ")"))
    else:
        gpus = []
        for i in range(n):
            p = torch.cuda.get_device_properties(i)
            gpus.append(f"{p.name} {_gib(p.total_memory)}")
        lines.append(f"gpu: {n} ({'; '.join(gpus)})")
    return lines


def extension_line():
    from nvfm import ops
    if os.environ.get("NVFM_OPS", "") == "reference":
        return "extension: not loaded (NVFM_OPS=reference forces the PyTorch references)"
    if not ops.extension_loaded():
        e = ops._EXT_ERROR
        why = (str(e).strip().splitlines() or [type(e).__name__])[0] if e is not None else "unknown"
        return (f"extension: not built or not loadable ({why}); every operator runs its PyTorch reference. "
                "Build it with `pip install --no-build-isolation -e .`")
    cpu = sum(ops.has_kernel(n, "cpu") for n in ops.OPS)
    if ops.cuda_compiled():
        have = [n for n in ops.OPS if ops.has_kernel(n, "cuda")]
        cuda = f"cuda kernels for {len(have)}/{len(ops.OPS)} ops"
        unverified = [n for n in have if not ops.cuda_kernel_trusted(n)]
        if unverified:  # auto_backend runs the reference for these: "built" alone would claim speed
            cuda += (f", {len(unverified)} not yet verified on a GPU so impl='auto' runs their PyTorch reference "
                     "(NVFM_CUDA_KERNELS=1 uses them)")
    else:
        cuda = "CUDA kernels not compiled (no nvcc at build time, or NVFM_CUDA=0)"
    line = f"extension: built (cpu kernels for {cpu}/{len(ops.OPS)} ops; {cuda})"
    problem = ops._problem()
    newer = newer_sources(ops._C.__file__)
    if newer:
        more = f" and {len(newer) - 3} more" if len(newer) > 3 else ""
        problem = ((problem + "; ") if problem else "") + (
            f"stale: {', '.join(newer[:3])}{more} changed after the build "
            "(rebuild: `pip install --no-build-isolation -e .`)")
    return line + (f"; {problem}" if problem else "")


def newer_sources(built, root=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))):
    """The extension's sources (root/csrc/*.cpp, *.cu, *.h) modified after the file `built` (the
    compiled library), as paths relative to root; [] when there is no csrc/ (a wheel install)."""
    when = os.path.getmtime(built)
    paths = [p for ext in ("cpp", "cu", "h") for p in glob.glob(os.path.join(root, "csrc", f"*.{ext}"))]
    return sorted(os.path.relpath(p, root) for p in paths if os.path.getmtime(p) > when)


def data_lines():
    from nvfm import phantom_anatomy as pa
    need = ("ch2.nii.gz", "ch2bet.nii.gz", "aal.nii.gz", "aal.nii.txt")  # what load_anatomy checks
    gone = [f for f in need if not os.path.exists(os.path.join(pa.MRICRON_DIR, f))]
    mricron = (f"mricron-data: present ({pa.MRICRON_DIR})" if not gone else
               f"mricron-data: missing ({', '.join(gone)} not in {pa.MRICRON_DIR}; apt-get install mricron-data; "
               "the phantom falls back to nilearn's templates)")
    exe = shutil.which("dcm2niix")
    dcm = (f"dcm2niix: {exe}" if exe else
           "dcm2niix: not on PATH (apt-get install dcm2niix; the DICOM tests compare against it)")
    return [mricron, dcm, wordnet_line()]


def wordnet_line():
    src = os.environ.get("NVFM_WORDNET_DIR", "/usr/share/wordnet")
    try:
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except Exception:
        return f"wordnet: not checked (nltk missing; METEOR reads {src})"
    need = [f for f in WordNetCorpusReader._FILES if f != "lexnames"]  # what report_metrics needs
    gone = [f for f in need if not os.path.exists(os.path.join(src, f))]
    if gone:
        return (f"wordnet: missing ({', '.join(gone)} not in {src}; "
                "apt-get install wordnet-base wordnet-sense-index; METEOR is reported as missing)")
    return f"wordnet: present ({src})"


def report():
    """The doctor's lines (a list of str, each "topic: finding")."""
    import nvfm
    lines = [f"nvfm: {nvfm.__version__} ({os.path.dirname(os.path.abspath(nvfm.__file__))})",
             f"python: {sys.version.split()[0]} ({sys.executable})"]
    for part in (torch_lines, lambda: [extension_line()]):
        try:
            lines += part()
        except Exception as e:  # a doctor reports, it does not crash
            lines.append(f"error: {type(e).__name__}: {e}")
    present, missing = packages()
    lines.append("packages present: " + (", ".join(f"{n} {v}" for n, v in present) or "none"))
    lines.append("packages missing: " + ("; ".join(f"{n} ({what})" for n, what, _ in missing) or "none"))
    try:
        lines += data_lines()
    except Exception as e:
        lines.append(f"error: {type(e).__name__}: {e}")
    return lines


def main():
    print("\n".join(report()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
