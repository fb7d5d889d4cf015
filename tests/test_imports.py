"""Start-up imports: TensorFlow comes in at first use, without Keras (and the matplotlib and
scikit-learn imports Keras makes), and Keras still loads when asked for."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_python(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_tensorflow_loads_at_first_use_without_keras(tmp_path):
    """Importing the training, predict and export modules and listing an image folder import no
    TensorFlow (a run compiles its first step meanwhile: vision_jax.train); the source's dataset
    imports it, without Keras (and the matplotlib and scikit-learn imports Keras makes)."""
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "a.jpg").write_bytes(b"")
    code = (
        "import sys, vision_jax.train, vision_jax.predict, vision_jax.export\n"
        "from vision_jax.data import from_image_folder\n"
        "names = ('tensorflow', 'keras', 'matplotlib', 'sklearn')\n"
        "loaded = lambda: sorted(m for m in names if m in sys.modules)\n"
        f"source = from_image_folder({str(tmp_path)!r}, 'train')\n"
        "before = loaded()\n"
        "print(before, loaded() if source.dataset.element_spec else None, source.num_examples)"
    )
    assert run_python(code) == "[] ['tensorflow'] 1"


@pytest.mark.slow
def test_keras_still_loads_after_the_import():
    code = (
        "import sys\n"
        "from vision_jax.tf_without_keras import tf\n"
        "assert tf.constant(0) == 0 and 'keras' not in sys.modules\n"
        "import keras\n"
        "layer = tf.keras.layers.Dense(3)\n"
        "print(layer(tf.ones([2, 4])).shape, keras.__name__)"
    )
    assert run_python(code) == "(2, 3) keras"


def direct_imports(package: str, allowed: str) -> list[str]:
    """Where vision_jax's modules other than ``allowed`` import ``package`` themselves."""
    direct = []
    for path in (ROOT / "vision_jax").rglob("*.py"):
        if path.name == allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            if any(name == package or name.startswith(f"{package}.") for name in names):
                direct.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return direct


def test_library_modules_import_tensorflow_only_through_tf_without_keras():
    direct = direct_imports("tensorflow", allowed="tf_without_keras.py")
    assert not direct, f"import tensorflow through vision_jax.tf_without_keras: {direct}"


@pytest.mark.slow
def test_reading_a_runs_curves_imports_no_keras(tmp_path):
    """TensorBoard imports TensorFlow itself: the report's curve reader loads it first, without
    Keras (a standalone ``python -m vision_jax.report`` saves Keras's import)."""
    from vision_jax.writer import MetricWriter

    writer = MetricWriter(str(tmp_path))
    writer.write_scalars(3, {"train/loss": 0.5})
    writer.close()
    code = (
        "import sys\n"
        "from vision_jax.report.curves import read_scalars\n"
        f"scalars = read_scalars({str(tmp_path)!r})\n"
        "print(scalars['train/loss'][0].tolist(), 'keras' in sys.modules)"
    )
    assert run_python(code) == "[3] False"


def test_the_library_logs_through_its_own_loggers(tmp_path):
    """Library calls log through ``logging.getLogger(__name__)``: a caller shows vision_jax's
    tables and warnings at INFO with ``logging.getLogger("vision_jax")`` while the root logger
    (and orbax's absl lines through it) stays at WARNING."""
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    code = (
        "import logging\n"
        "logging.basicConfig()\n"
        "logging.getLogger('vision_jax').setLevel(logging.INFO)\n"
        "from vision_jax.predict import image_files\n"
        "from vision_jax.weights.surgery import log_summary\n"
        f"image_files({str(tmp_path)!r})\n"  # warns of notes.txt
        "log_summary('w.npz', [], 3)\n"
        "logging.getLogger('absl').info('not shown')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING:vision_jax.predict:Left out 1 file(s)" in proc.stderr
    assert "INFO:vision_jax.weights.surgery:Pretrained weights from w.npz" in proc.stderr
    assert "not shown" not in proc.stderr


def test_dir_lists_the_lazy_exports():
    import vision_jax

    names = dir(vision_jax)
    for name in ("create_model", "Predictor", "train_and_evaluate", "load_pretrained"):
        assert name in names
    assert "__version__" in names


def test_importing_the_library_leaves_the_root_logger_to_the_script():
    """orbax logs through absl at import, and absl's log gives a root logger without handlers
    Python's basicConfig: a script's own logging.basicConfig(level, format) after importing
    vision_jax did nothing (vision_jax.orbax_import)."""
    code = (
        "import logging, vision_jax.train, vision_jax.predict, vision_jax.evaluate\n"
        "handlers = list(logging.root.handlers)\n"
        "logging.basicConfig(level=logging.INFO, format='mine: %(name)s %(message)s')\n"
        "logging.getLogger('script').info('hello')\n"
        "print(handlers)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"
    assert "mine: script hello" in proc.stderr.splitlines()
    direct = direct_imports("orbax", allowed="orbax_import.py")
    assert not direct, f"import orbax through vision_jax.orbax_import: {direct}"
