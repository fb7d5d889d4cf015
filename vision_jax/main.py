"""Command line: ``python -m vision_jax.main --config=configs/<name>.py[:arg] --workdir=<dir>``.

Any config field can be overridden with ``--config.<key>=<value>``. For multi-host runs pass
``--distributed`` (auto-detects Cloud TPU pods and SLURM) or the explicit coordinator flags.
"""

from __future__ import annotations

import json
import logging
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs (resumes from it).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (TPU pods, SLURM).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (implies distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.DEFINE_integer(
    "num_cpu_devices", None, "CPU devices per process (multi-process tests on one machine)."
)
flags.DEFINE_list(
    "local_device_ids",
    None,
    "Accelerators this process drives, e.g. 0,1,2,3,4,5,6,7 for one process per node on SLURM "
    "(which otherwise gives each process the one GPU of its SLURM_LOCALID).",
)
flags.mark_flags_as_required(["config", "workdir"])
HEADLINES = {"top1": "top-1 accuracy", "miou": "mean IoU"}


def initialize_distributed() -> None:
    """Starts JAX's multi-controller runtime when the flags ask for it."""
    explicit = [FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id]
    ids = FLAGS.local_device_ids
    local_device_ids = None if ids is None else [int(i) for i in ids]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise app.UsageError(
                "--coordinator_address, --num_processes and --process_id go together."
            )
        host, _, port = FLAGS.coordinator_address.rpartition(":")
        # The coordinator binds all interfaces by default; on one machine bind loopback only.
        local = host in ("127.0.0.1", "localhost")
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
            coordinator_bind_address=f"127.0.0.1:{port}" if local else None,
            local_device_ids=local_device_ids,
        )
    elif FLAGS.distributed:
        jax.distributed.initialize(local_device_ids=local_device_ids)


class _QuietOrbax(logging.Filter):
    """Drops orbax's per-save INFO chatter (dozens of lines per checkpoint); keeps warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietOrbax())
    if FLAGS.num_cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", FLAGS.num_cpu_devices)
    initialize_distributed()
    logging.info(
        "JAX process %d of %d, %d local / %d global devices (%s).",
        jax.process_index(), jax.process_count(), jax.local_device_count(),
        jax.device_count(), jax.devices()[0].platform,
    )  # fmt: skip
    from vision_jax.train import train_and_evaluate

    try:
        results = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (ValueError, RuntimeError, OSError) as e:
        logging.error("%s: %s", type(e).__name__, e)
        print(f"vision_jax: error: {e}", file=sys.stderr)
        sys.exit(1)
    line = json.dumps({k: round(v, 6) for k, v in sorted(results.items())})
    logging.info("Final metrics of process %d: %s", jax.process_index(), line)
    if jax.process_index() == 0:
        print(line)
        from vision_jax.tasks import TASKS

        headline = TASKS[FLAGS.config.task.name].headline
        if f"eval_before/{headline}" in results:
            print(
                f"{HEADLINES.get(headline, headline)} before fine-tuning "
                f"{results[f'eval_before/{headline}']:.4f}, after {results[f'eval/{headline}']:.4f}"
                f" ({int(results['eval/examples'])} examples)"
            )


if __name__ == "__main__":
    app.run(main)
