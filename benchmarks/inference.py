"""Inference of vision_jax's serving forms against timm, side by side, in one run: latency at
batch 1 and throughput at batch 32, the same weights in every form.

Forms (each measured in its own subprocess, every model and both batch sizes):
  jax           the jitted serving function (``vision_jax.export.Servable``: uint8 images in,
                normalisation, model, softmax)
  savedmodel    the exported SavedModel (jax2tf, batch-polymorphic) through its signature
  tflite        TFLite float32, converted at each batch size
  tflite_int8   TFLite dynamic-range int8 (int8 weights, activations quantised on the fly)
  timm          timm eager, float32, ``torch.no_grad``, on normalised float tensors (the
                normalisation is not timed)
  timm_compile  the same model under ``torch.compile`` (a failure is reported in the table)

Weights: ViT-Ti/16 from ../shared/weights/vit_ti16 (timm loads the safetensors file,
vision_jax converts the same tensors); other models (ResNet-50) random: timm's seeded
initialisation, written to a temporary safetensors file that both load (random weights run as
fast as trained ones). Every
form's probabilities on one probe image are compared with timm eager's (``max |dp|``).
Every form runs on all CPUs (TFLite's ``num_threads``, XLA's, TensorFlow's and torch's thread
pools), or on the first ``--cores``. Other processes on the CPUs slow multi-threaded eager torch
most (its OpenMP threads wait for each other at every op): the header prints the load average.

  python benchmarks/inference.py
  python benchmarks/inference.py --models resnet50 --forms jax tflite_int8 timm --batches 1 8
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

from vision_jax import host_memory

FORMS = ("timm", "timm_compile", "jax", "savedmodel", "tflite", "tflite_int8")
SHARED = os.environ.get(
    "VISION_JAX_SHARED", os.path.join(os.path.dirname(__file__), "..", "..", "shared")
)
VIT_WEIGHTS = os.path.join(SHARED, "weights", "vit_ti16", "vit_tiny_patch16_224.safetensors")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _normalisation(model_name: str) -> tuple[tuple, tuple]:
    return ((0.5,) * 3, (0.5,) * 3) if model_name.startswith("vit") else IMAGENET


def _probe(size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)


def _timed(fn, batch: int, seconds: float) -> dict:
    """Median, p10 and p90 seconds per call of ``fn()`` after one warm-up call (at least 2 timed
    calls, then until ``seconds`` have passed)."""
    fn()
    times, start = [], time.perf_counter()
    while len(times) < 2 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    t = np.asarray(times)
    return {
        "batch": batch,
        "median_s": float(np.median(t)),
        "p10_s": float(np.percentile(t, 10)),
        "p90_s": float(np.percentile(t, 90)),
        "calls": len(times),
    }


# --------------------------------------------------------------------------------------------
# workers (run in subprocesses)


def _import_timm():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from conftest import import_timm  # the CPU-torch import workaround for torchvision

    return import_timm()


def prepare_worker(job: dict) -> dict:
    """Writes timm's seeded random initialisation of each model to its ``weights`` file."""
    timm = _import_timm()
    import torch
    from safetensors.torch import save_file

    for m in job["models"]:
        torch.manual_seed(0)
        model = timm.create_model(m["timm_name"], num_classes=m["classes"])
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, m["weights"])
    return {}


def _pin(cores: int | None) -> None:
    """Pins this worker to the first ``cores`` CPUs it may use (None: all); XLA, TensorFlow,
    torch and TFLite (below) size their thread pools by them."""
    if cores:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])


def _servable(m: dict):
    """The model ``m`` with the timm weights in ``m["weights"]``, converted (no init)."""
    from vision_jax import create_model
    from vision_jax.export import Servable
    from vision_jax.tasks import Classification
    from vision_jax.weights.convert import from_timm
    from vision_jax.weights.files import read_safetensors

    model = create_model(m["name"], num_classes=m["classes"])
    variables = from_timm(read_safetensors(m["weights"]), model)
    mean, std = _normalisation(m["name"])
    return Servable(model, variables, Classification(), m["size"], mean, std)


def _vision_jax_runner(form: str, servable, batch: int, workdir: str):
    """``(run(images) -> probabilities, setup seconds)`` of one vision_jax form."""
    t0 = time.perf_counter()
    if form == "jax":
        import jax

        fn = jax.jit(servable)
        jax.block_until_ready(fn(np.zeros(servable.input_shape(batch), np.uint8)))

        def run(images):
            return np.asarray(jax.block_until_ready(fn(images))["probabilities"])

    elif form == "savedmodel":
        import tensorflow as tf

        from vision_jax.export import to_savedmodel

        if not os.path.isdir(workdir):
            to_savedmodel(servable, workdir)
        serve = tf.saved_model.load(workdir).signatures["serving_default"]

        def run(images):
            return serve(images=tf.constant(images))["probabilities"].numpy()

    else:
        from vision_jax.export import TFLiteModel, to_tflite

        quantize = "dynamic_int8" if form == "tflite_int8" else "none"
        content = to_tflite(servable, batch=batch, quantize=quantize)
        model = TFLiteModel(content, threads=len(os.sched_getaffinity(0)))

        def run(images):
            return model(images)["probabilities"]

    return run, time.perf_counter() - t0


def vision_jax_worker(job: dict) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in job["models"]:
            servable, results[m["name"]] = _servable(m), {}
            for batch in job["batches"]:
                workdir = os.path.join(tmp, m["name"])  # the SavedModel, exported once
                run, setup_s = _vision_jax_runner(job["form"], servable, batch, workdir)
                images = np.repeat(_probe(m["size"]), batch, 0)
                stats = _timed(functools.partial(run, images), batch, job["seconds"])
                probe = run(images)[0].tolist()
                results[m["name"]][str(batch)] = {**stats, "setup_s": setup_s, "probe": probe}
    return results


def _timm_results(model, m: dict, job: dict) -> dict:
    import torch

    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in _normalisation(m["name"]))
    results = {}
    for batch in job["batches"]:
        images = np.repeat(_probe(m["size"]), batch, 0)
        x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std

        def run(x=x):
            with torch.no_grad():
                return torch.softmax(model(x), -1)

        t0 = time.perf_counter()
        probe = run()[0].tolist()  # torch.compile compiles on the first call
        setup_s = time.perf_counter() - t0
        stats = _timed(run, batch, job["seconds"])
        results[str(batch)] = {**stats, "setup_s": setup_s, "probe": probe}
    return results


def timm_worker(job: dict) -> dict:
    timm = _import_timm()
    import torch
    from safetensors.torch import load_file

    results = {}
    for m in job["models"]:
        model = timm.create_model(m["timm_name"], num_classes=m["classes"])
        model.load_state_dict(load_file(m["weights"]))
        model.eval()
        if job["form"] == "timm_compile":
            model = torch.compile(model)
        results[m["name"]] = _timm_results(model, m, job)
    return results


# --------------------------------------------------------------------------------------------
# driver


def _run_worker(job: dict, timeout: int) -> dict | str:
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(job)],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"failed: timed out after {timeout} s"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        errors = [ln for ln in proc.stderr.splitlines() if re.match(r"\w+(Error|Exception)\b", ln)]
        return f"failed: {(errors or [f'exit status {proc.returncode}'])[-1][:160]}"
    return json.loads(lines[-1][len("RESULT ") :])


def _print_row(name: str, form: str, res: dict | str, timm: dict | str, batches: list[int]):
    if not isinstance(res, dict):
        print(f"{name:<9} {form:<13} {res}")
        return
    small, large = (res[str(b)] for b in batches)
    latency = small["median_s"] * 1e3
    throughput = large["batch"] / large["median_s"]
    ratio_small = ratio_large = drift = "-"
    if isinstance(timm, dict):
        ref_small, ref_large = (timm[str(b)] for b in batches)
        ratio_small = f"{ref_small['median_s'] * 1e3 / latency:.2f}x"
        ratio_large = f"{throughput * ref_large['median_s'] / large['batch']:.2f}x"
        drift = f"{np.abs(np.subtract(small['probe'], ref_small['probe'])).max():.1e}"
    setup = max(r["setup_s"] for r in res.values())
    print(f"{name:<9} {form:<13} {latency:>8.1f} {small['p10_s'] * 1e3:>6.1f}-"
          f"{small['p90_s'] * 1e3:<6.1f} {throughput:>9.1f} {ratio_small:>9} {ratio_large:>9} "
          f"{setup:>8.1f} {drift:>9}")  # fmt: skip


def _models(names: list[str], tmp: str) -> tuple[list[dict], list[dict]]:
    """The models to measure, and those whose random weights must be written first."""
    from vision_jax import model_spec

    models, random = [], []
    for name in names:
        spec = model_spec(name)
        m = {"name": name, "timm_name": spec.timm_name, "size": spec.input_size}
        if name == "vit_ti16":  # the shared pretrained weights
            m.update(classes=200, weights=VIT_WEIGHTS)
            if not os.path.isfile(VIT_WEIGHTS):
                print(f"{name:<9} weights: {VIT_WEIGHTS} is absent")
                continue
        else:
            m.update(classes=1000, weights=os.path.join(tmp, f"{name}.safetensors"))
            random.append(m)
        models.append(m)
    return models, random


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vit_ti16", "resnet50"])
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    parser.add_argument("--batches", nargs=2, type=int, default=[1, 32],
                        metavar=("LATENCY_BATCH", "THROUGHPUT_BATCH"))  # fmt: skip
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="time per form and batch (at least 2 timed calls)")  # fmt: skip
    parser.add_argument("--cores", type=int, help="run every form on this many CPUs (default all)")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        job = json.loads(args.worker)
        _pin(job.get("cores"))
        if job["form"] == "prepare":
            result = prepare_worker(job)
        elif job["form"].startswith("timm"):
            result = timm_worker(job)
        else:
            host_memory.set_up_single_process()  # as python -m vision_jax.main runs
            result = vision_jax_worker(job)
        print("RESULT " + json.dumps(result))
        return

    print(f"# inference at each model's input size, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, using {args.cores or 'all'} (load average "
          f"{os.getloadavg()[0]:.1f} at the start); batch "
          f"{args.batches[0]} latency, batch {args.batches[1]} throughput; ratios: timm eager's "
          "time / this form's")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        models, random = _models(args.models, tmp)
        if random:
            prepared = _run_worker({"form": "prepare", "models": random}, args.timeout)
            if not isinstance(prepared, dict):
                sys.exit(f"random weights: {prepared}")
        job = {"models": models, "batches": args.batches, "seconds": args.seconds,
               "cores": args.cores}  # fmt: skip
        results = {}
        for form in ("timm", *(f for f in args.forms if f != "timm")):  # timm: the reference
            results[form] = _run_worker({**job, "form": form}, args.timeout)
            print(f"# {form} measured", file=sys.stderr, flush=True)
    print(f"{'model':<9} {'form':<13} {'ms b' + str(args.batches[0]):>8} {'p10-p90 ms':<13} "
          f"{'img/s b' + str(args.batches[1]):>9} {'vs timm':>9} {'vs timm':>9} {'setup s':>8} "
          f"{'max |dp|':>9}")  # fmt: skip
    rows = []
    for m in models:
        timm = _of(results["timm"], m["name"])
        for form in args.forms:
            res = _of(results[form], m["name"])
            _print_row(m["name"], form, res, timm, args.batches)
            rows.append({"model": m["name"], "form": form, "result": res})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batches": args.batches, "rows": rows}, f, indent=1)


def _of(result: dict | str, name: str) -> dict | str:
    """One model's part of a worker's result (or the worker's failure)."""
    return result[name] if isinstance(result, dict) else result


if __name__ == "__main__":
    main()
