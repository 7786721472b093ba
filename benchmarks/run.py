"""kdpm2 against diffusers' KDPM2DiscreteScheduler, side by side in one process: one table of ratios, one JSON.

    python -m benchmarks                      # torch CPU, JAX; writes benchmarks/results/<time>.json
    python -m benchmarks --device cuda        # the per-substep rows on a GPU
    python -m benchmarks --quick --output x.json
    python -m benchmarks --no-page-faults     # both sides without page faults (glibc malloc tunables)

Every timing is the median of repeated runs, the two implementations interleaved (A B A B ...) so that load
from other processes falls on both. The rows:

- ``substep``: ``scale_model_input`` + ``step`` per substep, averaged over a whole 25-step loop (49 substeps,
  the first step's timestep look-up included for both), same inputs for both schedulers. The 16x4x256x256 row
  is judged only under ``--no-page-faults``: with default malloc both sides' times depend on how many fresh
  pages each touches (see docs/performance.md), so it is shown there, not judged.
- ``step vs floor``: our ``step`` alone against the memory floor, the time to read two arrays and write two
  (twice the measured time of copying one array: a copy reads one and writes one). Shown, not judged.
- ``set_timesteps(1000)``: Karras sigmas.
- ``cold start``: a fresh interpreter that imports the library, builds a scheduler and sets 25 timesteps; ours
  must import neither torch nor jax.
- ``flow substep``: a flow-matching schedule (the SD3-medium config, shift 3) on an SD3 latent (1x16x128x128):
  our ``step`` per substep against diffusers' ``FlowMatchEulerDiscreteScheduler.step`` per step, what an SD3
  pipeline calls. Shown, not judged: Euler makes one model call per step, DPM2 two.
- ``jax loop``: the jitted whole-loop ``functional.sample`` against the eager Python loop over the stateful
  scheduler, both on the JAX backend, with a cheap model (compilation excluded: done once beforehand).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
STEPS = 25
#: glibc malloc settings under which arrays up to 32 MiB come from the heap and freed memory is never given
#: back to the OS: no array then costs page faults on its first write (``--no-page-faults``)
NO_PAGE_FAULTS = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=17179869184"


# -- timing helpers -----------------------------------------------------------------------------------------------
def interleaved(functions: dict, repeats: int, *, self_timed: bool = False) -> dict:
    """Seconds of each zero-argument function, called in turn ``repeats`` times (after one warm-up).

    With ``self_timed`` the functions time their own loop into ``fn.elapsed`` (setup left out), and that is
    what is recorded."""
    for fn in functions.values():
        fn()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(fn.elapsed if self_timed else time.perf_counter() - start)
    return times


def row(name, ours: list, reference: list, target=None, *, judged=True, unit="ms", scale=1e3, kind="max", note=""):
    """A table row from repeated timings of ours and of the reference: the ratio of their medians. A target
    with ``judged=False`` is shown for reference but not checked (``ok`` is None)."""
    ratio = statistics.median(ours) / statistics.median(reference)
    ok = None if target is None or not judged else (ratio <= target if kind == "max" else ratio >= target)
    return {
        "benchmark": name,
        "ours": statistics.median(ours) * scale,
        "reference": statistics.median(reference) * scale,
        "unit": unit,
        "ratio": ratio,
        "ratio_of_minima": min(ours) / min(reference),  # the least disturbed runs: a check on machine load
        "target": None if target is None else f"{'<=' if kind == 'max' else '>='} {target}",
        "ok": ok,
        "note": note,
        "repeats": len(ours),
    }


# -- torch: the substep loop -------------------------------------------------------------------------------------
def substep_rows(shape, device, repeats, *, floor: bool, ancestral: bool = False) -> list[dict]:
    """Rows of the stateful loop against diffusers' class; ``ancestral``: DPM2 a against diffusers'
    KDPM2AncestralDiscreteScheduler, both drawing their step noise from a torch.Generator (shown, not judged)."""
    import diffusers
    import torch

    import kdpm2core

    name = "KDPM2AncestralDiscreteScheduler" if ancestral else "KDPM2DiscreteScheduler"

    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=generator).to(device)
    output = (0.5 * torch.randn(shape, generator=generator)).to(device)
    ours = getattr(kdpm2core, name)(backend="torch")
    theirs = getattr(diffusers, name)()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    label = "x".join(map(str, shape))

    def loop(scheduler, substeps, scale=True):
        def run():
            scheduler.set_timesteps(STEPS, device=device)
            timesteps = scheduler.timesteps[:substeps]
            noise = {"generator": torch.Generator(device=device).manual_seed(1)} if ancestral else {}
            sync()
            start = time.perf_counter()
            x = x0
            for t in timesteps:
                if scale:
                    scheduler.scale_model_input(x, t)
                x = scheduler.step(output, t, x, return_dict=False, **noise)[0]
            sync()
            run.elapsed = time.perf_counter() - start

        return run

    # time only the loop (set_timesteps is its own row): each callable stores its loop time
    big = int(np.prod(shape)) > 1 << 20
    substeps = 10 if big else 2 * STEPS - 1  # 10 = five Euler and five midpoint substeps
    calls = {"ours": loop(ours, substeps), "diffusers": loop(theirs, substeps)}
    if floor:
        calls["ours step only"] = loop(ours, substeps, scale=False)
        calls["floor torch"] = copies(shape, device, substeps, "torch")
        if device == "cpu":
            calls["floor numpy"] = copies(shape, device, substeps, "numpy")
    times = interleaved(calls, repeats, self_timed=True)
    per = {name: [value / substeps for value in values] for name, values in times.items()}
    if floor:  # the machine's copy bandwidth: the faster copy of each round
        per["floor"] = [min(values) for values in zip(*(per[name] for name in calls if name.startswith("floor")))]
    target = 0.5 if big else 0.33
    # the substep targets are set for torch CPU; the large one for a malloc that keeps freed memory
    judged = torch.device(device).type == "cpu" and (not big or os.environ.get("GLIBC_TUNABLES") == NO_PAGE_FAULTS)
    rows = [
        row(
            f"substep{' DPM2 a' if ancestral else ''} ({label}, {device})",
            per["ours"],
            per["diffusers"],
            None if ancestral else target,
            judged=judged,
            note="scale_model_input + step" + (", noise from a torch.Generator" if ancestral else ""),
        )
    ]
    if floor:
        rows.append(
            row(
                f"step vs memory floor ({label})",
                per["ours step only"],
                per["floor"],
                note="floor: read 2 + write 2 arrays",
            )
        )
        rows.append(
            row(
                f"substep vs memory floor ({label})",
                per["ours"],
                per["floor"],
                note="scale_model_input reads 1 + writes 1 more",
            )
        )
    return rows


def copies(shape, device, substeps, how):
    """The memory floor of ``substeps`` substeps: two array copies each (a copy reads one array, writes one)
    with torch's ``copy_`` or NumPy's ``copyto``, timed in the same interleaved rounds as the schedulers so
    that machine load falls on both alike."""
    import torch

    sources = [torch.randn(shape, device=device) for _ in range(2)]
    targets = [torch.empty(shape, device=device) for _ in range(2)]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if how == "numpy":
        sources, targets = [t.numpy() for t in sources], [t.numpy() for t in targets]

    def run():
        sync()
        start = time.perf_counter()
        for _ in range(substeps):
            for source, target in zip(sources, targets):
                if how == "numpy":
                    np.copyto(target, source)
                else:
                    target.copy_(source)
        sync()
        run.elapsed = time.perf_counter() - start

    return run


def set_timesteps_row(repeats) -> dict:
    from diffusers import KDPM2DiscreteScheduler as Diffusers

    import kdpm2core

    ours = kdpm2core.KDPM2DiscreteScheduler(backend="torch", use_karras_sigmas=True)
    theirs = Diffusers(use_karras_sigmas=True)
    times = interleaved(
        {"ours": lambda: ours.set_timesteps(1000), "diffusers": lambda: theirs.set_timesteps(1000)}, repeats
    )
    return row("set_timesteps(1000), Karras", times["ours"], times["diffusers"], 0.1)


SD3_MEDIUM_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def flow_row(repeats, device="cpu") -> dict:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    import kdpm2core

    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 16, 128, 128, generator=generator).to(device)
    velocity = torch.randn(1, 16, 128, 128, generator=generator).to(device)
    ours = kdpm2core.KDPM2DiscreteScheduler.from_config(SD3_MEDIUM_SCHEDULER, backend="torch")
    theirs = FlowMatchEulerDiscreteScheduler.from_config(SD3_MEDIUM_SCHEDULER)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def loop(scheduler):
        def run():
            scheduler.set_timesteps(STEPS, device=device)
            timesteps = scheduler.timesteps
            x = x0
            sync()
            start = time.perf_counter()
            for t in timesteps:
                x = scheduler.step(velocity, t, x, return_dict=False)[0]
            sync()
            run.elapsed = (time.perf_counter() - start) / len(timesteps)  # per substep, set_timesteps left out

        return run

    times = interleaved({"ours": loop(ours), "diffusers": loop(theirs)}, repeats, self_timed=True)
    return row(
        "flow substep 1x16x128x128 (vs FlowMatchEuler step)",
        times["ours"],
        times["diffusers"],
        unit="us",
        scale=1e6,
        note="shown, not judged: per model call",
    )


OURS_COLD = (
    "import kdpm2core; s = kdpm2core.KDPM2DiscreteScheduler(); s.set_timesteps(25); import sys; "
    "assert 'torch' not in sys.modules and 'jax' not in sys.modules, 'a framework was imported'"
)
DIFFUSERS_COLD = "from diffusers import KDPM2DiscreteScheduler; s = KDPM2DiscreteScheduler(); s.set_timesteps(25)"


def cold_start_row(repeats) -> dict:
    def command(code):
        def run():
            subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)

        return run

    times = interleaved({"ours": command(OURS_COLD), "diffusers": command(DIFFUSERS_COLD)}, repeats)
    return row(
        "cold start (new interpreter)",
        times["ours"],
        times["diffusers"],
        0.15,
        unit="s",
        scale=1.0,
        note="ours imports neither torch nor jax",
    )


# -- JAX: jitted whole loop against the eager stateful loop -------------------------------------------------------------
def jax_row(repeats, device=None) -> dict:
    import jax
    import jax.numpy as jnp

    import kdpm2core
    from kdpm2core import functional as F

    def model(scaled, timestep):
        return jnp.tanh(scaled) * 0.5

    plan = F.make_plan(num_inference_steps=STEPS, backend="jax")
    x0 = jax.random.normal(jax.random.key(0), (1, 4, 32, 32)) * F.init_noise_sigma(plan)
    jitted = jax.jit(lambda x: F.sample(plan, model, x))
    scheduler = kdpm2core.KDPM2DiscreteScheduler(backend="jax")

    def compiled():
        jitted(x0).block_until_ready()

    def eager():
        scheduler.set_timesteps(STEPS)
        x = x0
        for t in scheduler.timesteps:
            x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x, return_dict=False)[0]
        x.block_until_ready()

    times = interleaved({"jit": compiled, "eager": eager}, repeats)
    platform_name = jax.devices()[0].platform
    # reported as eager / jit: a speed-up, to be at least 5
    return row(
        f"jax loop speed-up, 1x4x32x32 ({platform_name})",
        times["eager"],
        times["jit"],
        5,
        kind="min",
        note="eager stateful time / jitted sample time",
    )


# -- machine and output --------------------------------------------------------------------------------------------
def machine(device: str) -> dict:
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
    }
    for module in ("numpy", "torch", "jax", "diffusers"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if device.startswith("cuda"):
            info["gpu"] = torch.cuda.get_device_name(device)
    except ImportError:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def table(rows: list[dict]) -> str:
    """The rows as one text table: medians, their ratio, the ratio of the minima, the target."""
    header = f"{'benchmark':40} {'ours':>11} {'diffusers/ref':>13} {'ratio':>7} {'(minima)':>9} {'target':>8}  ok"
    lines = [header, "-" * len(header)]
    for r in rows:
        ok = ("" if r["target"] is None else "-") if r["ok"] is None else ("yes" if r["ok"] else "NO")
        lines.append(
            f"{r['benchmark']:40} {r['ours']:>8.3f} {r['unit']:2} {r['reference']:>10.3f} {r['unit']:2} "
            f"{r['ratio']:>7.3f} {r['ratio_of_minima']:>9.3f} {r['target'] or '':>8}  {ok}"
        )
    if any(r["ok"] is None and r["target"] is not None for r in rows):
        lines.append(
            "-: shown for reference (targets are set for torch CPU; the large substep's under --no-page-faults)"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device of the substep rows (default cpu)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run; noisier figures)")
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for the torch rows (default: torch's)")
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=["small", "large", "ancestral", "set_timesteps", "flow", "cold", "jax"],
    )
    parser.add_argument(
        "--no-page-faults",
        action="store_true",
        help="run in a new process whose malloc keeps freed memory (glibc tunables), so that neither side pays "
        "page faults for fresh arrays: diffusers allocates several per step, and by default pays them",
    )
    args = parser.parse_args(argv)
    if args.no_page_faults and os.environ.get("GLIBC_TUNABLES") != NO_PAGE_FAULTS:
        argv = sys.argv[1:] if argv is None else argv
        environ = dict(os.environ, GLIBC_TUNABLES=NO_PAGE_FAULTS)
        return subprocess.run([sys.executable, "-m", "benchmarks", *argv], env=environ, check=False).returncode
    repeats = 3 if args.quick else 9
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    rows = []
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("diffusers is not installed: only the jax row runs (pip install diffusers)", file=sys.stderr)
        args.skip += ["small", "large", "ancestral", "set_timesteps", "flow", "cold"]
    if "small" not in args.skip:
        rows += substep_rows((1, 4, 64, 64), args.device, repeats * 10, floor=False)  # a loop is only 1 to 3 ms
    if "large" not in args.skip:
        rows += substep_rows((16, 4, 256, 256), args.device, repeats, floor=True)
    if "ancestral" not in args.skip:
        rows += substep_rows((1, 4, 64, 64), args.device, repeats * 10, floor=False, ancestral=True)
    if "set_timesteps" not in args.skip:
        rows.append(set_timesteps_row(repeats * 3))
    if "flow" not in args.skip:
        rows.append(flow_row(repeats, args.device))
    if "cold" not in args.skip:
        rows.append(cold_start_row(max(3, repeats // 2)))
    if "jax" not in args.skip:
        try:
            rows.append(jax_row(repeats))
        except ImportError as exc:
            print(f"jax row skipped: {exc}", file=sys.stderr)

    result = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "repeats": repeats,
        "machine": machine(args.device),
        "rows": rows,
    }
    print(table(rows))
    print(f"\nmachine: {json.dumps(result['machine'])}")
    RESULTS.mkdir(exist_ok=True)
    targets = [RESULTS / f"bench-{result['time'].replace(':', '')}-{args.device.replace(':', '')}.json"]
    if args.output:
        targets.append(args.output)
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {', '.join(map(str, targets))}")
    return 0 if all(r["ok"] is not False for r in rows) else 1
