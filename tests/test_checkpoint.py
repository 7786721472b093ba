"""Checkpoint and resume: a run interrupted before any substep, after an Euler substep or after a midpoint
substep, saved to disk and finished in a NEW process, ends bit-identical to an uninterrupted run, on every
backend and dtype (bfloat16 included); loading rejects anything malformed or tampered with."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdpm2core import KDPM2DiscreteScheduler
from kdpm2core.checkpoint import STATE_FILE, load_checkpoint, save_checkpoint

from conftest import BACKENDS, initial_noise

# case -> (backend, dtype, config, schedule); each case is saved before every substep and resumed from each
CASES = {
    "numpy-float64-epsilon": ("numpy", "float64", {}, {"steps": 4}),
    "numpy-float32-v-karras": (
        "numpy",
        "float32",
        {"prediction_type": "v_prediction", "use_karras_sigmas": True},
        {"steps": 3},
    ),
    "torch-float32-sample-sigmas": (
        "torch",
        "float32",
        {"prediction_type": "sample"},
        {"sigmas": [9.5, 4.0, 1.25, 0.5, 0.0]},
    ),
    "torch-bfloat16-epsilon": ("torch", "bfloat16", {"beta_schedule": "scaled_linear"}, {"steps": 3}),
    "jax-float32-img2img": (
        "jax",
        "float32",
        {"timestep_spacing": "leading", "steps_offset": 1},
        {"steps": 5, "begin": 4},
    ),
    "jax-bfloat16-v": ("jax", "bfloat16", {"prediction_type": "v_prediction"}, {"steps": 3}),
}

# case -> (backend, dtype, make_plan options, steps): the same for the functional API's State
FUNCTIONAL_CASES = {
    "functional-numpy-float32": ("numpy", "float32", {}, 4),
    "functional-torch-bfloat16-v": ("torch", "bfloat16", {"prediction_type": "v_prediction"}, 3),
    "functional-jax-float32-karras": ("jax", "float32", {"use_karras_sigmas": True}, 3),
}

# Both processes run this file: "save" runs each case once, checkpointing before every substep; "resume"
# loads each checkpoint and finishes the run. Finals are written as host arrays (bfloat16 widened exactly).
DRIVER = r'''
import json, sys
from pathlib import Path
import numpy as np
from kdpm2core import KDPM2DiscreteScheduler
from kdpm2core import functional as F
from kdpm2core.checkpoint import load_checkpoint, load_functional_checkpoint, save_checkpoint, save_functional_checkpoint

def model(xp, x, t):
    return xp.sin(x * 1.3) * 0.5 + x * (0.02 * float(t) / 1000.0)

def start(backend, dtype, config, schedule):
    s = KDPM2DiscreteScheduler(**config, backend=backend)
    if "sigmas" in schedule:
        s.set_timesteps(sigmas=schedule["sigmas"])
    else:
        s.set_timesteps(schedule["steps"])
    if "begin" in schedule:
        s.set_begin_index(schedule["begin"])
    b = s.backend
    noise = np.random.default_rng(0).standard_normal((2, 3, 5)) * s.init_noise_sigma
    return s, b.asarray(noise, dtype=b.dtype(dtype))

def finish(s, x, checkpoints=None):
    """Run the rest of the loop, as a pipeline would, from wherever s stands."""
    xp = s.backend.xp
    first = s.step_index if s.step_index is not None else (s.begin_index or 0)
    for i in range(first, len(s.timesteps)):
        if checkpoints is not None:
            save_checkpoint(checkpoints / str(i), s, sample=x)
        t = s.timesteps[i]
        x = s.step(model(xp, s.scale_model_input(x, t), t), t, x).prev_sample
    if checkpoints is not None:
        save_checkpoint(checkpoints / str(len(s.timesteps)), s, sample=x)
    host = s.backend.to_numpy(x)
    return host.astype(np.float32) if host.dtype.kind == "V" else host  # JAX gives ml_dtypes.bfloat16

def host(b, x):
    h = b.to_numpy(x)
    return h.astype(np.float32) if h.dtype.kind == "V" else h

def functional_start(backend, dtype, options, steps):
    plan = F.make_plan(num_inference_steps=steps, backend=backend, dtype=dtype, **options)
    b = plan.info.backend
    noise = np.random.default_rng(1).standard_normal((2, 3, 5)) * F.init_noise_sigma(plan)
    x = b.asarray(noise, dtype=b.dtype(dtype))
    return plan, F.init(plan, x), x

def functional_finish(plan, state, x, checkpoints=None):
    b = plan.info.backend
    for k in range(int(b.to_numpy(state.index)), F.num_substeps(plan)):
        if checkpoints is not None:
            save_functional_checkpoint(checkpoints / str(k), plan, state, sample=x)
        scaled, t = F.model_inputs(plan, state, x)
        (x, _), state = F.step(plan, state, model(b.xp, scaled, t), x)
    if checkpoints is not None:
        save_functional_checkpoint(checkpoints / str(F.num_substeps(plan)), plan, state, sample=x)
    return host(b, x)

mode, root, every = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
cases, functional_cases = every["stateful"], every["functional"]
report = {}
for name, (backend, dtype, options, steps) in functional_cases.items():
    out = root / name
    if mode == "save":
        plan, state, x = functional_start(backend, dtype, options, steps)
        np.save(out / "saver_final.npy", functional_finish(plan, state, x, checkpoints=out), allow_pickle=False)
    else:
        plan = functional_start(backend, dtype, options, steps)[0]  # rebuilt from the same arguments
        report[name] = {}
        for point in sorted((p for p in out.iterdir() if p.is_dir()), key=lambda p: int(p.name)):
            state, arrays = load_functional_checkpoint(point, plan)
            report[name][point.name] = int(plan.info.backend.to_numpy(state.index))
            np.save(out / f"resumed_{point.name}.npy", functional_finish(plan, state, arrays["sample"]), allow_pickle=False)
for name, (backend, dtype, config, schedule) in cases.items():
    out = root / name
    if mode == "save":
        s, x = start(backend, dtype, config, schedule)
        np.save(out / "saver_final.npy", finish(s, x, checkpoints=out), allow_pickle=False)
    else:
        stored = {}
        for point in sorted((p for p in out.iterdir() if p.is_dir()), key=lambda p: int(p.name)):
            s, arrays = load_checkpoint(point)
            stored[point.name] = not s.state_in_first_order
            np.save(out / f"resumed_{point.name}.npy", finish(s, arrays["sample"]), allow_pickle=False)
        report[name] = stored
print(json.dumps(report))
'''


def run_driver(mode: str, root: Path, script: Path) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in ("KDPM2_LOAD_PLUGINS", "KDPM2_BACKEND")}
    command = [
        sys.executable,
        str(script),
        mode,
        str(root),
        json.dumps({"stateful": CASES, "functional": FUNCTIONAL_CASES}),
    ]
    done = subprocess.run(command, env=environ, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Save in one process, resume every checkpoint in another; returns (root, {case: {point: had_stored}})."""
    root = tmp_path_factory.mktemp("checkpoints")
    script = root / "driver.py"
    script.write_text(DRIVER)
    for name in [*CASES, *FUNCTIONAL_CASES]:
        (root / name).mkdir()
    run_driver("save", root, script)
    return root, run_driver("resume", root, script)


def uninterrupted(backend, dtype, config, schedule) -> tuple[np.ndarray, int]:
    """The same run in this process, in one go, no checkpoint written; returns (final, number of substeps)."""
    namespace: dict = {}
    exec(DRIVER.split("mode, root, every")[0], namespace)  # the driver's model, start and finish
    s, x = namespace["start"](backend, dtype, config, schedule)
    return namespace["finish"](s, x), len(s.timesteps)


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_in_new_process_is_bit_identical(resumed, case):
    root, report = resumed
    backend, dtype, config, schedule = CASES[case]
    reference, substeps = uninterrupted(backend, dtype, config, schedule)
    assert np.all(np.isfinite(reference))
    points = report[case]
    # a checkpoint before every remaining substep and one after the last, both kinds of interruption included
    assert sorted(map(int, points)) == list(range(schedule.get("begin", 0), substeps + 1))
    assert any(points.values()), "no checkpoint between an Euler and a midpoint substep"
    assert not all(points.values()), "no checkpoint after a midpoint substep"
    saver = np.load(root / case / "saver_final.npy", allow_pickle=False)
    assert saver.dtype == reference.dtype and saver.tobytes() == reference.tobytes()
    for point in points:
        final = np.load(root / case / f"resumed_{point}.npy", allow_pickle=False)
        assert final.dtype == reference.dtype, point
        assert final.tobytes() == reference.tobytes(), f"resumed at substep {point} differs"


# -- validation ---------------------------------------------------------------------------------------------
def numpy_run_after_euler(tmp_path, **config) -> tuple[KDPM2DiscreteScheduler, np.ndarray, Path]:
    """A numpy scheduler stopped after its third substep (an Euler substep), checkpointed into tmp_path."""
    s = KDPM2DiscreteScheduler(**config)
    s.set_timesteps(4)
    x = np.linspace(-2.0, 2.0, 12).reshape(3, 4) * s.init_noise_sigma
    for t in s.timesteps[:3]:
        x = s.step(0.3 * np.tanh(x), t, x).prev_sample
    assert not s.state_in_first_order
    save_checkpoint(tmp_path, s, sample=x)
    return s, x, tmp_path


def edit_manifest(directory: Path, change, *, rehash: bool = True) -> None:
    """Edit the checkpoint JSON; with ``rehash`` also recompute the SHA-256 of its contents, as a deliberate
    editor (or another tool writing checkpoints) would, so that the checks behind that one are reached."""
    path = directory / STATE_FILE
    manifest = json.loads(path.read_text())
    digest = manifest.pop("sha256")
    change(manifest)
    manifest["sha256"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest() if rehash else digest
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "change",
    [lambda m: m["state"].update(step_index=1), lambda m: m["arrays"]["sample"].update(dtype="float32")],
    ids=["step_index", "dtype"],
)
def test_hand_edits_of_the_json_are_detected(tmp_path, change):
    numpy_run_after_euler(tmp_path)
    load_checkpoint(tmp_path)  # intact: loads
    edit_manifest(tmp_path, change, rehash=False)
    with pytest.raises(ValueError, match="does not match its sha256: edited, or damaged"):
        load_checkpoint(tmp_path)
    path = tmp_path / STATE_FILE
    manifest = json.loads(path.read_text())
    del manifest["sha256"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="has no sha256 of its contents"):
        load_checkpoint(tmp_path)


def test_a_key_given_twice_is_refused(tmp_path):
    numpy_run_after_euler(tmp_path)
    path = tmp_path / STATE_FILE
    path.write_text(path.read_text().replace('"step_index": 3,', '"step_index": 3, "step_index": 1,'))
    with pytest.raises(ValueError, match="key 'step_index' appears more than once"):
        load_checkpoint(tmp_path)


def test_checkpoint_files_are_plain_json_and_npy(tmp_path):
    s, x, directory = numpy_run_after_euler(tmp_path)
    assert sorted(p.name for p in directory.iterdir()) == ["_stored.npy", STATE_FILE, "sample.npy"]
    manifest = json.loads((directory / STATE_FILE).read_text())
    assert manifest["state"]["step_index"] == 3 and manifest["state"]["schedule"]["num_inference_steps"] == 4
    assert manifest["stored"]["shape"] == [3, 4] and manifest["stored"]["dtype"] == "float64"
    with open(directory / "_stored.npy", "rb") as f:  # a .npy that needs no pickle
        assert np.lib.format.read_array(f, allow_pickle=False).tobytes() == s.state_dict()["stored"].tobytes()


def test_state_dict_round_trip_keeps_custom_schedule(tmp_path):
    s = KDPM2DiscreteScheduler(prediction_type="sample")
    s.set_timesteps(3, num_train_timesteps=500)  # an override that only the schedule request remembers
    x = np.ones(5)
    x = s.step(np.zeros(5), s.timesteps[0], x).prev_sample
    save_checkpoint(tmp_path, s)
    loaded, arrays = load_checkpoint(tmp_path)
    assert arrays == {}
    assert loaded.config == s.config and loaded.step_index == 1
    assert np.array_equal(loaded.timesteps, s.timesteps) and np.array_equal(loaded.sigmas, s.sigmas)
    a = loaded.step(np.full(5, 0.5), loaded.timesteps[1], x).prev_sample
    b = s.step(np.full(5, 0.5), s.timesteps[1], x).prev_sample
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda m: m["state"].update(step_index="3"), TypeError, ["step_index", "integer"]),
        (lambda m: m["state"].update(step_index=99), ValueError, ["step_index", "[0, 7]"]),
        (lambda m: m["state"].update(step_index=True), TypeError, ["step_index"]),
        (lambda m: m["state"].update(begin_index=-1), ValueError, ["begin_index"]),
        (lambda m: m["state"].update(step_index=2), ValueError, ["stored", "Euler"]),
        (lambda m: m.update(stored=None), ValueError, ["midpoint", "stored sample"]),
        (lambda m: m["state"]["schedule"].update(num_inference_steps=5), ValueError, ["schedule", "differs"]),
        (lambda m: m["state"]["schedule"].update(num_inference_steps="4"), TypeError, ["num_inference_steps"]),
        (
            lambda m: m["state"]["schedule"].update(num_inference_steps=10**12),
            ValueError,
            ["num_inference_steps", "at most"],
        ),
        (lambda m: m["state"]["schedule"].update(sigmas=["14", "0"]), TypeError, ["sigmas"]),
        (lambda m: m["state"]["config"].update(prediction_type="v_prediction"), ValueError, ["differs"]),
        (lambda m: m["state"]["config"].update(prediction_type=3), TypeError, ["prediction_type"]),
        (lambda m: m["state"]["config"].update(beta_end=2.0), ValueError, ["beta_end"]),
        (lambda m: m["state"]["config"].update(_use_default_values="beta_end"), TypeError, ["_use_default_values"]),
        (lambda m: m["state"]["config"].update(_use_default_values=["evil"]), TypeError, ["_use_default_values"]),
        (lambda m: m["state"].pop("begin_index"), ValueError, ["keys"]),
        (lambda m: m["state"].update(format="other/9"), ValueError, ["format"]),
        (lambda m: m.update(format="kdpm2.checkpoint/99"), ValueError, ["format"]),
        (lambda m: m.update(extra=1), ValueError, ["keys"]),
        (lambda m: m.update(state=[]), TypeError, ["state"]),
        (lambda m: m.update(backend="no-such-backend"), LookupError, ["no-such-backend"]),
        (lambda m: m["arrays"]["sample"].update(shape=[4, 3]), ValueError, ["sample.npy", "[4, 3]"]),
        (lambda m: m["arrays"]["sample"].update(dtype="float16"), ValueError, ["sample.npy", "host_dtype", "float16"]),
        (lambda m: m["arrays"]["sample"].update(shape=[3, -4]), TypeError, ["shape"]),
        (lambda m: m["arrays"]["sample"].update(shape=[10**30, 10**30]), ValueError, ["sample.npy"]),
        (lambda m: m["arrays"]["sample"].update(host_dtype="i4,i4"), ValueError, ["host_dtype"]),
        (lambda m: m["arrays"]["sample"].update(dtype="sum"), ValueError, ["dtype", "'sum'"]),
        (lambda m: m["arrays"]["sample"].update(host_dtype="|O"), ValueError, ["host_dtype"]),
        (lambda m: m["arrays"]["sample"].update(sha256="0" * 64), ValueError, ["SHA-256"]),
        (lambda m: m["arrays"].update({"../escape": m["arrays"]["sample"]}), ValueError, ["../escape"]),
        (lambda m: m["stored"].update(shape=[12]), ValueError, ["_stored.npy"]),
    ],
)
def test_tampered_manifest_is_rejected_with_a_clear_error(tmp_path, change, error, words):
    numpy_run_after_euler(tmp_path)
    edit_manifest(tmp_path, change)
    with pytest.raises(error) as caught:
        load_checkpoint(tmp_path)
    for word in words:
        assert word in str(caught.value)


def test_torn_or_edited_array_file_is_rejected(tmp_path):
    _, _, directory = numpy_run_after_euler(tmp_path)
    data = bytearray((directory / "_stored.npy").read_bytes())
    data[-1] ^= 1  # one flipped bit in the last element
    (directory / "_stored.npy").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        load_checkpoint(directory)
    (directory / "_stored.npy").unlink()
    with pytest.raises(FileNotFoundError, match="_stored.npy"):
        load_checkpoint(directory)
    (directory / STATE_FILE).write_bytes(b"\xff\xfe not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_checkpoint(directory)
    with pytest.raises(FileNotFoundError, match=STATE_FILE):
        load_checkpoint(directory / "nowhere")


class _Marker:
    """Unpickling this would create a file: the proof that a loader unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_pickled_array_is_never_unpickled(tmp_path):
    _, _, directory = numpy_run_after_euler(tmp_path)
    marker = tmp_path / "unpickled"
    hostile = np.empty(12, dtype=object)
    hostile[:] = [_Marker(str(marker))] * 12
    np.save(directory / "sample.npy", hostile.reshape(3, 4), allow_pickle=True)
    digest = hashlib.sha256((directory / "sample.npy").read_bytes()).hexdigest()
    edit_manifest(directory, lambda m: m["arrays"]["sample"].update(sha256=digest))  # a careful attacker
    with pytest.raises(ValueError, match="sample.npy"):
        load_checkpoint(directory)
    assert not marker.exists()


def test_failed_load_leaves_the_scheduler_unchanged():
    s = KDPM2DiscreteScheduler()
    s.set_timesteps(4)
    x = np.ones(3)
    x = s.step(np.ones(3), s.timesteps[0], x).prev_sample
    state = s.state_dict()
    target = KDPM2DiscreteScheduler(prediction_type="sample")
    target.set_timesteps(6)
    before = (target.config, target.step_index, target.timesteps.copy())
    broken = dict(state, step_index=1000)
    with pytest.raises(ValueError, match="step_index"):
        target.load_state_dict(broken)
    assert (target.config, target.step_index) == before[:2] and np.array_equal(target.timesteps, before[2])
    with pytest.raises(TypeError, match="stored"):
        target.load_state_dict(dict(state, stored=[1.0, 1.0, 1.0]))  # not an array of the backend
    with pytest.raises(TypeError, match="dict"):
        target.load_state_dict([("format", 1)])
    target.load_state_dict(state)
    assert target.config == s.config and target.step_index == 1 and not target.state_in_first_order


def test_save_rejects_bad_names_and_foreign_arrays(tmp_path):
    s = KDPM2DiscreteScheduler()
    with pytest.raises(ValueError, match="_hidden"):
        save_checkpoint(tmp_path, s, _hidden=np.ones(2))
    with pytest.raises(TypeError, match="'sample'"):
        save_checkpoint(tmp_path, s, sample=[1.0, 2.0])
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        save_checkpoint(tmp_path / "file", s)


def test_checkpoint_moves_between_backends(tmp_path):
    torch = pytest.importorskip("torch")
    s, x, directory = numpy_run_after_euler(tmp_path)
    loaded, arrays = load_checkpoint(directory, backend="torch")
    assert isinstance(arrays["sample"], torch.Tensor) and arrays["sample"].dtype == torch.float64
    y = loaded.step(0.3 * torch.tanh(arrays["sample"]), loaded.timesteps[3], arrays["sample"]).prev_sample
    expected = s.step(0.3 * np.tanh(x), s.timesteps[3], x).prev_sample
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("case", sorted(FUNCTIONAL_CASES))
def test_functional_state_resumes_in_new_process_bit_identical(resumed, case):
    root, report = resumed
    namespace: dict = {}
    exec(DRIVER.split("mode, root, every")[0], namespace)
    plan, state, x = namespace["functional_start"](*FUNCTIONAL_CASES[case])
    reference = namespace["functional_finish"](plan, state, x)
    assert np.all(np.isfinite(reference))
    points = report[case]
    n = len(plan.table)
    assert {int(k): v for k, v in points.items()} == {k: k for k in range(n + 1)}  # the index came back
    for point in points:
        final = np.load(root / case / f"resumed_{point}.npy", allow_pickle=False)
        assert final.dtype == reference.dtype and final.tobytes() == reference.tobytes(), f"resumed at {point}"
    saver = np.load(root / case / "saver_final.npy", allow_pickle=False)
    assert saver.tobytes() == reference.tobytes()


def test_functional_checkpoint_rejects_another_plan_and_bad_index(tmp_path):
    from kdpm2core import functional as F
    from kdpm2core.checkpoint import load_functional_checkpoint, save_functional_checkpoint

    plan = F.make_plan(num_inference_steps=4, backend="numpy", dtype="float64")
    x = np.ones(3)
    state = F.init(plan, x)
    (x, _), state = F.step(plan, state, np.full(3, 0.1), x)
    save_functional_checkpoint(tmp_path, plan, state, sample=x)
    loaded, arrays = load_functional_checkpoint(tmp_path, plan)
    assert (
        int(loaded.index) == 1
        and loaded.stored.tobytes() == state.stored.tobytes()
        and arrays["sample"].tobytes() == x.tobytes()
    )
    for other in (
        F.make_plan(num_inference_steps=5, backend="numpy", dtype="float64"),
        F.make_plan(num_inference_steps=4, backend="numpy", dtype="float32"),
        F.make_plan(num_inference_steps=4, backend="numpy", dtype="float64", prediction_type="sample"),
    ):
        with pytest.raises(ValueError, match="plan differs"):
            load_functional_checkpoint(tmp_path, other)
    save_functional_checkpoint(tmp_path, plan, state._replace(index=np.asarray(99, dtype=np.int32)))
    with pytest.raises(ValueError, match="index must be"):
        load_functional_checkpoint(tmp_path, plan)
    save_checkpoint(tmp_path / "stateful", KDPM2DiscreteScheduler())
    with pytest.raises(ValueError, match="not a functional checkpoint"):
        load_functional_checkpoint(tmp_path / "stateful", plan)


# -- fuzzing the manifest --------------------------------------------------------------------------------------
def _paths(value, prefix=()):
    """Every key path into a JSON value."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, (*prefix, i))


def test_any_edit_of_the_manifest_loads_or_fails_clearly(tmp_path_factory):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    directory = tmp_path_factory.mktemp("fuzzed")
    numpy_run_after_euler(directory)
    original = json.loads((directory / STATE_FILE).read_text())
    paths = [p for p in _paths(original) if p]
    replacement = st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-5, 10**6)
        | st.integers()
        | st.floats(allow_nan=False)
        | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
        max_leaves=5,
    )

    @settings(
        max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(path=st.sampled_from(paths), value=replacement, delete=st.booleans())
    def check(path, value, delete):
        manifest = json.loads(json.dumps(original))
        *parents, last = path
        holder = manifest
        for key in parents:
            holder = holder[key]
        if delete and isinstance(holder, dict):
            del holder[last]
        else:
            holder[last] = value
        (directory / STATE_FILE).write_text(json.dumps(manifest))
        try:
            scheduler, arrays = load_checkpoint(directory)
        except (ValueError, TypeError, LookupError, FileNotFoundError) as error:
            assert str(error), type(error)
            return
        # an accepted edit (say, another valid step_index) leaves a scheduler that samples on, or says why not
        x = arrays.get("sample", np.ones((3, 4)))
        try:
            for t in scheduler.timesteps[scheduler.step_index or 0 :]:
                x = scheduler.step(0.3 * np.tanh(x), t, x).prev_sample
        except ValueError as error:
            assert "substep" in str(error) or "shape" in str(error), error

    check()


@pytest.mark.parametrize("name", BACKENDS)
def test_copied_and_pickled_schedulers_share_the_backend_and_continue_alike(name):
    """copy.deepcopy and pickle mid-loop: the twin shares the backend object and steps exactly as the original."""
    scheduler = KDPM2DiscreteScheduler(backend=name, prediction_type="v_prediction")
    scheduler.set_timesteps(4)
    b = scheduler.backend
    x = b.asarray(initial_noise((1, 2, 8, 8)))
    t = scheduler.timesteps[0]
    x = scheduler.step(x * 0.1, t, x).prev_sample  # now mid-loop: a midpoint substep is due
    for twin in (copy.deepcopy(scheduler), pickle.loads(pickle.dumps(scheduler))):
        assert twin.backend is b
        t = scheduler.timesteps[1]
        ours = twin.step(x * 0.2, t, x).prev_sample
        theirs = copy.deepcopy(scheduler).step(x * 0.2, t, x).prev_sample
        assert np.array_equal(b.to_numpy(ours), b.to_numpy(theirs))
    assert scheduler.step_index == 1  # the copies did not advance the original


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    """Every array is encoded before any file is written; and a write that fails (a full disk, here fsync)
    removes its temporary file and leaves the old one."""
    torch = pytest.importorskip("torch")
    s = KDPM2DiscreteScheduler(backend="torch")
    s.set_timesteps(4)
    x = torch.linspace(-2.0, 2.0, 12).reshape(3, 4)
    save_checkpoint(tmp_path, s, latents=x)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(TypeError, match="float8"):
        save_checkpoint(tmp_path, s, latents=2 * x, extra=torch.zeros(2, dtype=torch.float8_e4m3fn))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with pytest.raises(TypeError, match="float8"):
        save_checkpoint(tmp_path / "new", s, latents=2 * x, extra=torch.zeros(2, dtype=torch.float8_e4m3fn))
    assert not (tmp_path / "new").exists()

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, s, latents=2 * x)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary file, old files intact
    monkeypatch.undo()
    _, arrays = load_checkpoint(tmp_path)
    assert torch.equal(arrays["latents"], x)


def test_long_custom_schedules_save_and_load(tmp_path):
    s = KDPM2DiscreteScheduler()
    s.set_timesteps(sigmas=np.geomspace(80.0, 0.01, 60001).tolist() + [0.0])  # a JSON of about 1.5 MB
    save_checkpoint(tmp_path, s)
    assert (tmp_path / STATE_FILE).stat().st_size > 1 << 20
    loaded, _ = load_checkpoint(tmp_path)
    assert np.array_equal(loaded.sigmas, s.sigmas)


def test_float64_on_a_backend_without_it_is_refused(tmp_path):
    jax = pytest.importorskip("jax")
    if jax.config.jax_enable_x64:
        pytest.skip("jax_enable_x64 is on: JAX holds float64")
    numpy_run_after_euler(tmp_path)  # float64 arrays
    with pytest.raises(ValueError, match="is float64, which backend 'jax' cannot hold.*jax_enable_x64"):
        load_checkpoint(tmp_path, backend="jax")


def test_a_device_the_backend_cannot_reach_is_a_clear_error(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    numpy_run_after_euler(tmp_path)
    with pytest.raises(ValueError, match="cannot be placed on device 'cuda' of backend 'torch'"):
        load_checkpoint(tmp_path, backend="torch", device="cuda")
