"""Checkpoints on disk without pickle: one JSON file plus one ``.npy`` file per array.

A checkpoint holds a scheduler's :meth:`~kdpm2core.KDPM2DiscreteScheduler.state_dict` and any arrays of the
caller's loop (the current latents, say), so that a run interrupted anywhere, also between an Euler and a
midpoint substep, finishes bit-identical in another process::

    save_checkpoint("ckpt", scheduler, sample=latents)
    ...  # later, in a new process
    scheduler, arrays = load_checkpoint("ckpt")
    latents = arrays["sample"]

Arrays are written with ``allow_pickle=False`` and read with NumPy's plain ``.npy`` reader, never ``np.load``
(which would also open ``.npz`` archives). ``bfloat16``, which NumPy lacks, is stored widened to float32, which
holds it exactly, and narrowed back on load; float8 types are refused. Every array file carries a SHA-256 in the
JSON, and the JSON one of its own contents; the JSON is written last, and every file is replaced atomically
(written beside it, synced, renamed). So a checkpoint torn by a crash while saving, or edited by hand, fails to
load with a clear error (an integrity check, not a signature: whoever edits the JSON can also recompute it);
and a save that fails (a dtype that cannot be stored) fails before it writes anything.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from kdpm2core import config as _config
from kdpm2core.backend import check_array
from kdpm2core.scheduler import KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler

_SCHEDULERS = (KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler)  # a checkpoint's state format names one

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "save_functional_checkpoint",
    "load_functional_checkpoint",
    "STATE_FILE",
    "CHECKPOINT_FORMAT",
]

STATE_FILE = "kdpm2_checkpoint.json"
#: the layouts this version writes and reads (the JSON records each file's SHA-256 and one of its own contents)
CHECKPOINT_FORMAT = "kdpm2.checkpoint/2"
FUNCTIONAL_FORMAT = "kdpm2.functional-checkpoint/2"
#: the largest checkpoint JSON that is written or read (its size grows with the number of steps)
MAX_MANIFEST_BYTES = 16 << 20
STORED = "_stored"  # file stem of the scheduler's stored sample; caller names cannot start with "_"
_ARRAY_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
_DTYPES = frozenset(
    "bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 bfloat16 float32 float64 complex64 complex128".split()
)


def _save_target(directory: str | os.PathLike, backend, arrays: dict) -> Path:
    """``directory`` as a Path, after checking that it is not a file and that ``arrays`` are named by
    identifiers and are arrays of ``backend`` (every check before any write)."""
    directory = Path(directory)
    if directory.is_file():
        raise ValueError(f"checkpoint directory {str(directory)!r} is a file")
    for name, x in arrays.items():
        if not _ARRAY_NAME.match(name):
            raise ValueError(
                f"array name {name!r} must be an identifier starting with a letter (at most 64 characters)"
            )
        check_array(backend, f"array {name!r}", x)
    return directory


def save_checkpoint(directory: str | os.PathLike, scheduler: KDPM2DiscreteScheduler, **arrays) -> Path:
    """Write ``scheduler``'s state and ``arrays`` (backend arrays, by name) into ``directory``; returns the
    JSON file's path. Names are identifiers; a later save into the same directory replaces the checkpoint."""
    backend = scheduler.backend
    directory = _save_target(directory, backend, arrays)
    state = scheduler.state_dict()
    stored = state.pop("stored")
    files = {name: _encode_array(backend, x) for name, x in arrays.items()}  # every check before any write
    if stored is not None:
        files[STORED] = _encode_array(backend, stored)
    manifest = {
        "format": CHECKPOINT_FORMAT,
        "backend": backend.name,
        "state": state,
        "stored": files[STORED][1] if stored is not None else None,
        "arrays": {name: files[name][1] for name in arrays},
    }
    return _write_checkpoint(directory, files, manifest)


def load_checkpoint(
    directory: str | os.PathLike, *, backend=None, device=None, scheduler_class=None
) -> tuple[KDPM2DiscreteScheduler, dict]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Args:
        directory: The checkpoint directory.
        backend: Backend to resume on (default: the one that saved it).
        device: Device for the schedule and every array.
        scheduler_class: The class to build (a subclass of :class:`KDPM2DiscreteScheduler` or
            :class:`KDPM2AncestralDiscreteScheduler`); default: the class that saved the checkpoint.

    Returns:
        ``(scheduler, arrays)``: a scheduler positioned where the saved one was, and the saved arrays by name.

    Raises:
        FileNotFoundError: No checkpoint in ``directory``.
        ValueError, TypeError: A file is malformed, tampered with, or inconsistent; the message names it.
    """
    directory = Path(directory)
    path = directory / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no kdpm2 checkpoint in {str(directory)!r} (missing {STATE_FILE})")
    manifest = _read_manifest(path)
    expected = {"format", "backend", "state", "stored", "arrays"}
    if set(manifest) != expected:
        raise ValueError(f"{STATE_FILE} has keys {sorted(manifest)}; expected {sorted(expected)}")
    if manifest["format"] != CHECKPOINT_FORMAT:
        raise ValueError(f"{STATE_FILE} has format {manifest['format']!r}; this kdpm2 reads {CHECKPOINT_FORMAT!r}")
    if not isinstance(manifest["state"], dict):
        raise TypeError(f"{STATE_FILE}: 'state' must be an object")
    if not isinstance(manifest["arrays"], dict):
        raise TypeError(f"{STATE_FILE}: 'arrays' must be an object")
    if backend is None:
        if not isinstance(manifest["backend"], str):
            raise TypeError(f"{STATE_FILE}: 'backend' must be a string")
        backend = manifest["backend"]
    if scheduler_class is None:
        saved = manifest["state"].get("format")
        scheduler_class = next(
            (cls for cls in _SCHEDULERS if cls._state_format() == saved), KDPM2DiscreteScheduler
        )  # an unknown format: load_state_dict names it
    scheduler = scheduler_class(backend=backend)
    placed = scheduler.backend.device(device)
    read = {}
    for name, entry in manifest["arrays"].items():
        if not isinstance(name, str) or not _ARRAY_NAME.match(name):
            raise ValueError(f"{STATE_FILE}: array name {name!r} is not an identifier")
        read[name] = _read_array(directory / f"{name}.npy", scheduler.backend, entry, placed)
    stored = manifest["stored"]
    state = dict(manifest["state"])
    state["stored"] = (
        None if stored is None else _read_array(directory / f"{STORED}.npy", scheduler.backend, stored, placed)
    )
    scheduler.load_state_dict(state, device=device)
    return scheduler, read


def save_functional_checkpoint(directory: str | os.PathLike, plan, state, **arrays) -> Path:
    """Write a :class:`kdpm2core.functional.State` (and ``arrays``) into ``directory``; returns the JSON path.

    A plan is code (the arguments of ``make_plan``), so it is not saved: its fingerprint is, and
    :func:`load_functional_checkpoint` checks that the plan it is given is the same one.
    """
    backend = plan.info.backend
    directory = _save_target(directory, backend, arrays)
    named = {"index": state.index, "stored": state.stored, **{f"array_{k}": v for k, v in arrays.items()}}
    files = {name: _encode_array(backend, x) for name, x in named.items()}
    manifest = {
        "format": FUNCTIONAL_FORMAT,
        "backend": backend.name,
        "plan_sha256": _plan_digest(plan),
        "arrays": {name: entry for name, (_, entry) in files.items()},
    }
    return _write_checkpoint(directory, files, manifest)


def load_functional_checkpoint(directory: str | os.PathLike, plan) -> tuple:
    """Read what :func:`save_functional_checkpoint` wrote, onto ``plan``'s backend and device.

    Returns:
        ``(state, arrays)``: the functional state and the saved arrays by name.

    Raises:
        ValueError: ``plan`` is not the plan the checkpoint was saved with, or a file is malformed or edited.
    """
    from kdpm2core.functional import State, num_substeps

    directory = Path(directory)
    path = directory / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no kdpm2 checkpoint in {str(directory)!r} (missing {STATE_FILE})")
    manifest = _read_manifest(path)
    expected = {"format", "backend", "plan_sha256", "arrays"}
    if set(manifest) != expected or manifest.get("format") != FUNCTIONAL_FORMAT:
        raise ValueError(
            f"{STATE_FILE} is not a functional checkpoint ({FUNCTIONAL_FORMAT}) with keys {sorted(expected)}"
        )
    if manifest["plan_sha256"] != _plan_digest(plan):
        raise ValueError(
            "the plan differs from the one this checkpoint was saved with (schedule, prediction type, churn, "
            "dtype or backend); build it with the same make_plan arguments"
        )
    entries = manifest["arrays"]
    if not isinstance(entries, dict) or not {"index", "stored"} <= set(entries):
        raise ValueError(f"{STATE_FILE}: 'arrays' must hold index and stored")
    backend, device = plan.info.backend, plan.info.device
    read = {}
    for name, entry in entries.items():
        user = isinstance(name, str) and name.startswith("array_") and _ARRAY_NAME.match(name[6:])
        if name not in ("index", "stored") and not user:
            raise ValueError(f"{STATE_FILE}: unexpected array {name!r}")
        read[name] = _read_array(directory / f"{name}.npy", backend, entry, device)
    index = read.pop("index")
    host_index = backend.to_numpy(index)
    if host_index.shape != () or host_index.dtype.kind != "i" or not 0 <= int(host_index) <= num_substeps(plan):
        raise ValueError(f"{STATE_FILE}: index must be a 0-d integer in [0, {num_substeps(plan)}], got {host_index!r}")
    state = State(index, read.pop("stored"))
    return state, {name[6:]: x for name, x in read.items()}


def _plan_digest(plan) -> str:
    """Fingerprint of everything a functional loop reads from ``plan``, as the backend holds it."""
    backend = plan.info.backend
    digest = hashlib.sha256(f"{backend.name}|{plan.info.dtype}|{plan.info.prediction_type}|{plan.info.churn}".encode())
    for part in (plan.timesteps, plan.sigmas, plan.input_scale, plan.table, plan.noise):
        host = np.ascontiguousarray(backend.to_numpy(part))
        digest.update(str(host.dtype).encode() + str(host.shape).encode() + host.tobytes())
    return digest.hexdigest()


def _dtype_name(dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]  # "torch.bfloat16" -> "bfloat16"; NumPy and JAX print bare names


def _write_checkpoint(directory: Path, files: dict, manifest: dict) -> Path:
    """Write the encoded arrays, then the JSON with the SHA-256 of its own contents; returns the JSON's path."""
    data = (json.dumps({**manifest, "sha256": _manifest_digest(manifest)}, indent=1, allow_nan=False) + "\n").encode()
    if len(data) > MAX_MANIFEST_BYTES:  # refused now rather than saved and then unreadable
        raise ValueError(f"the checkpoint's {STATE_FILE} would be {len(data)} bytes; the limit is {MAX_MANIFEST_BYTES}")
    directory.mkdir(parents=True, exist_ok=True)
    for name, (buffer, _) in files.items():
        _replace(directory / f"{name}.npy", buffer)
    target = directory / STATE_FILE
    _replace(target, data)
    return target


def _read_manifest(path: Path) -> dict:
    """The checkpoint JSON, checked against the SHA-256 of its contents that it carries."""
    manifest = _config.load_config_file(path, what="checkpoint", limit=MAX_MANIFEST_BYTES)
    digest = manifest.pop("sha256", None)
    if digest is None and manifest.get("format") in (CHECKPOINT_FORMAT, FUNCTIONAL_FORMAT):
        raise ValueError(f"{STATE_FILE} in {str(path.parent)!r} has no sha256 of its contents")
    if digest is not None and digest != _manifest_digest(manifest):
        raise ValueError(f"{STATE_FILE} in {str(path.parent)!r} does not match its sha256: edited, or damaged")
    return manifest


def _manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest's contents in one canonical form (sorted keys), which writer and reader share."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, allow_nan=False).encode()).hexdigest()


def _encode_array(backend, x) -> tuple[bytes, dict]:
    """``x`` as ``.npy`` bytes and its JSON entry, or a TypeError for a dtype a checkpoint cannot hold."""
    name = _dtype_name(x.dtype)
    try:
        same = backend.dtype(name) == x.dtype
    except TypeError:
        same = False
    if not same or name not in _DTYPES:
        raise TypeError(f"cannot checkpoint dtype {x.dtype}: backend {backend.name!r} does not name it {name!r}")
    host = np.asarray(backend.to_numpy(x))  # (not ascontiguousarray: it would make a 0-d array 1-d)
    if host.dtype.kind not in "biufc":  # bfloat16 / float8 arrive as NumPy extension dtypes that .npy cannot name
        if host.dtype.itemsize >= 4:
            raise TypeError(f"cannot checkpoint dtype {x.dtype}: .npy has no such type and float32 cannot hold it")
        host = host.astype(np.float32)
    buffer = _npy_bytes(host)
    return buffer, {
        "dtype": name,
        "host_dtype": host.dtype.str,
        "shape": list(host.shape),
        "sha256": hashlib.sha256(buffer).hexdigest(),
    }


def _npy_bytes(host: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, host, allow_pickle=False)
    return out.getvalue()


def _replace(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, so a crash leaves either the old file or the new one; on an
    error (a full disk) the temporary file is removed and the old file stays."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _read_array(path: Path, backend, entry, device):
    where = f"checkpoint array {path.name!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "host_dtype", "shape", "sha256"}:
        raise ValueError(f"{where}: its entry in {STATE_FILE} must hold dtype, host_dtype, shape and sha256")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise TypeError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if not all(isinstance(entry[key], str) for key in ("dtype", "host_dtype", "sha256")):
        raise TypeError(f"{where}: dtype, host_dtype and sha256 must be strings")
    if entry["dtype"] not in _DTYPES:
        raise ValueError(f"{where}: dtype {entry['dtype']!r} is not one of {', '.join(sorted(_DTYPES))}")
    try:
        host_dtype = np.dtype(entry["host_dtype"])
    except (TypeError, ValueError):
        raise ValueError(f"{where}: host_dtype {entry['host_dtype']!r} is not a NumPy dtype") from None
    if host_dtype.kind not in "biufc":
        raise ValueError(f"{where}: host_dtype {entry['host_dtype']!r} is not a numeric dtype")
    stored_as = np.dtype("float32") if entry["dtype"] == "bfloat16" else np.dtype(entry["dtype"])
    if host_dtype != stored_as.newbyteorder(host_dtype.byteorder):
        raise ValueError(f"{where}: host_dtype {entry['host_dtype']!r} is not how a {entry['dtype']} array is stored")
    if entry["dtype"] == "float64" and not backend.float64:
        raise ValueError(
            f"{where} is float64, which backend {backend.name!r} cannot hold (float64=False; for JAX, turn on "
            "jax_enable_x64): resume on another backend"
        )
    # the size is known before reading: a tampered header cannot make us allocate more
    expected = math.prod(shape) * host_dtype.itemsize  # Python integers: a huge shape cannot overflow
    if not path.is_file():
        raise FileNotFoundError(f"{where} is missing from {str(path.parent)!r}")
    data = path.read_bytes() if path.stat().st_size <= expected + 65536 else None
    if data is None or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"{where} does not match the SHA-256 in {STATE_FILE}: torn by a crash while saving, or edited")
    try:
        host = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{where} is not a valid .npy file: {exc}") from None
    if host.dtype != host_dtype or list(host.shape) != shape:
        raise ValueError(f"{where} holds {host.dtype}{list(host.shape)}; {STATE_FILE} says {host_dtype}{shape}")
    try:
        return backend.asarray(host, dtype=backend.dtype(entry["dtype"]), device=device)
    except (AssertionError, RuntimeError) as exc:  # torch without CUDA asserts, a full device raises
        raise ValueError(
            f"{where} cannot be placed on device {str(device)!r} of backend {backend.name!r}: {exc}"
        ) from None
