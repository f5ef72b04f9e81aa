"""Run directories and files that may live on local disk or in a bucket (gs://, s3://).

A TPU pod's hosts share no disk, so a pod run's workdir is a gs:// URL. Orbax writes
checkpoints through etils.epath and TensorBoard event files go through tensorboardX, which both
speak gs:// (with the `tpu` extra: gcsfs and google-cloud-storage); our own files (the trained
tokenizer, results JSON) go through the helpers here. Local paths are made absolute, URLs are
left as they are (os.path.abspath would turn gs://b/x into ./gs:/b/x).
"""

import os
import shutil
import tempfile

from etils import epath


def is_url(path) -> bool:
    return "://" in str(path)


def absolute(path) -> str:
    return str(path) if is_url(path) else os.path.abspath(path)


def makedirs(path) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def exists(path) -> bool:
    return epath.Path(path).exists()


def read_bytes(path) -> bytes:
    return epath.Path(path).read_bytes()


def write_text(path, text: str) -> None:
    """Writes `text` to `path`; on local disk through a temporary file and a rename, so a reader
    never sees half a file (an object store's upload is atomic already)."""
    if is_url(path):
        epath.Path(path).write_text(text)
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a results file is for everyone to read
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def copy_local_file(local: str, dest) -> None:
    """Copies a local file to `dest` (a local path or a URL)."""
    if is_url(dest):
        epath.Path(local).copy(epath.Path(dest), overwrite=True)
    else:
        shutil.copyfile(local, dest)
