"""Command line: ``python -m vision_jax.main --config=configs/<name>.py[:arg] --workdir=<dir>``.

Any config field can be overridden with ``--config.<key>=<value>``. For multi-host runs pass
``--distributed`` (auto-detects Cloud TPU pods and SLURM) or the explicit coordinator flags.

Exit status: 0 done; 1 an error (one line on stderr; details in the log); 2 a usage error (bad
flag, unknown config key, missing config file: found before JAX starts); 69 a peer process of a
multi-process run was lost (:mod:`vision_jax.watchdog`; when the coordinator is lost JAX aborts
the others, and :mod:`vision_jax.abort_notice` replaces its message with one line); 75 stopped
by SIGTERM / SIGINT / SIGUSR1 / SIGUSR2 / SIGHUP after saving a checkpoint: run the same
command again to resume (:mod:`vision_jax.signals`).
"""

from __future__ import annotations

import faulthandler
import logging
import math
import os
import signal
import sys
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from vision_jax import processes
from vision_jax.abort_notice import route_stderr
from vision_jax.compilation_cache import EMPTY_SETTING, configure_compilation_cache
from vision_jax.host_memory import configure_dispatch, restart_for_xla_buffers
from vision_jax.output_errors import is_url, printable, workdir_problem
from vision_jax.signals import (
    EXIT_STOPPED,
    SIGNALS,
    defaulted,
    flush_stdout,
    give_back,
    take,
    tell,
)
from vision_jax.watchdog import EXIT_PEER_LOST

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
flags.DEFINE_float(
    "peer_timeout",
    30.0,
    "Multi-process runs: seconds without a heartbeat after which a peer process counts as lost "
    f"and every other process exits (status {EXIT_PEER_LOST}); 0 = JAX's own, slower, handling.",
)
flags.DEFINE_float(
    "connect_timeout",
    300.0,
    "Multi-process runs: seconds each process waits for all of them to connect to the "
    f"coordinator at the start before it exits (status {EXIT_PEER_LOST}).",
)
flags.register_validator(
    "connect_timeout", lambda v: 1 <= v < math.inf, "must be at least 1 (seconds)."
)
flags.DEFINE_string(
    "compilation_cache",
    "auto",
    "JAX's persistent compilation cache, so that a resume or another run of the same config "
    "starts without recompiling: a folder, 'auto' (JAX's own setting, JAX_COMPILATION_CACHE_DIR, "
    "if there is one, else jax_cache beside the workdir) or 'off'.",
)
flags.register_validator("compilation_cache", lambda v: bool(v.strip()), EMPTY_SETTING)
flags.DEFINE_bool(
    "report",
    True,
    "At the end, write <workdir>/report/report.html (vision_jax.report: per-class metrics, "
    "confusion matrix, training curves, hardest examples); single-process runs only.",
)
flags.mark_flags_as_required(["config", "workdir"])
# The library tasks' headlines in words (a task of one's own, and a subclass that changes its
# headline, prints the metric's name)
HEADLINES = {
    "classification": "top-1 accuracy",
    "segmentation": "mean IoU",
    "detection": "COCO mAP@[.5:.95]",
}
EXIT_ERROR, EXIT_USAGE = 1, 2


def _usage_error(message: str) -> None:
    print(f"vision_jax: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def _config_argument(argv: list[str]) -> str | None:
    """The value of ``--config`` in ``argv`` (either ``--config=X`` or ``--config X``)."""
    for i, arg in enumerate(argv):
        if arg.startswith(("--config=", "-config=")):
            return arg.split("=", 1)[1]
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _unknown_override(argv: list[str], value: str) -> str | None:
    """The message for the first ``--config.<key>`` of ``argv`` that the config lacks."""
    from vision_jax.config import unknown_key

    config = FLAGS["config"].parser.parse(value)  # loads the file again, unchanged
    for arg in argv:
        if arg.lstrip("-").startswith("config."):
            key = arg.lstrip("-").split("=", 1)[0].removeprefix("config.")
            if (message := unknown_key(config, key)) is not None:
                return message
    return None


def _unset_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` without its ``--config.<key>=None`` (or ``--config.<key> None``) overrides
    (absl parses None as the key's type and fails), and the keys they unset that no later
    override of the same key sets again (the last one wins, as for other flags)."""
    kept, unset, skip = [], [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        name, equals, value = arg.lstrip("-").partition("=")
        is_config = arg.startswith("-") and name.startswith("config.")
        key = name.removeprefix("config.")
        spaced = is_config and not equals and argv[i + 1 : i + 2] == ["None"]
        if is_config:
            unset = [k for k in unset if k != key]
        if spaced or (is_config and equals and value == "None"):
            unset.append(key)
            skip = spaced
        else:
            kept.append(arg)
    return kept, unset


def _apply_unset(config: Any, keys: list[str]) -> None:
    """Sets each of ``keys`` (dotted) of ``config`` to None; an unknown key or a section is
    a usage error naming it."""
    from vision_jax.config import is_section, unknown_key

    for key in keys:
        if (message := unknown_key(config, key)) is not None:
            _usage_error(message)
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node[name]
        if is_section(node[leaf]):
            _usage_error(f"config.{key} is a section: unset its keys one by one.")
        node[leaf] = None


def _config_file_error(message: str, value: str | None) -> str | None:
    """The error the config file raised (``get_config``'s own, e.g. an unknown variant), from
    the traceback ml_collections puts in the message: the lines after the traceback's last
    indented one, without the exception's type."""
    if "Error whilst parsing config file" not in message:
        return None
    lines = message.strip().splitlines()
    indented = [i for i, line in enumerate(lines) if line.startswith(" ")]
    text = " ".join(lines[indented[-1] + 1 :] if indented else lines[-1:])
    kind, _, rest = text.partition(": ")
    return f"--config={value}: {rest if kind.isidentifier() and rest else text}"


# The start of Python's message when absl parses a --config.<key> value as the key's type,
# and that type
_PARSE_FAILURES = {
    "invalid literal for int()": int,
    "could not convert string to float": float,
    "('Non-boolean argument to boolean flag'": bool,
}


def _bad_override_value(message: str) -> str | None:
    """For absl's ``flag --config.<key>=<value>: <Python's int(), float() or bool message>``,
    one line naming the key, what it takes and the value (``config.wrong_type``'s, as a config
    file's value gets); None for other messages."""
    from vision_jax.config import wrong_type

    flag, _, failure = message.partition(": ")
    key, equals, value = flag.removeprefix("flag --config.").partition("=")
    kind = next((k for start, k in _PARSE_FAILURES.items() if failure.startswith(start)), None)
    if not flag.startswith("flag --config.") or not equals or kind is None:
        return None
    return wrong_type(key, kind, value, "--config.{key}={value}")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with one-line errors for a missing config file, unknown config keys
    and a workdir that cannot be one (before JAX starts), and ``--config.<key>=None`` to unset
    an optional key."""
    value = _config_argument(argv)
    if value is not None and not os.path.isfile(path := value.split(":", 1)[0]):
        _usage_error(f"config file {path} not found.")
    argv, unset = _unset_overrides(argv)
    sys.argv = [*argv]  # ml_collections finds --config.<key> overrides in sys.argv too
    try:
        rest = FLAGS(argv)
        _apply_unset(FLAGS.config, unset)
    except flags.Error as e:
        _usage_error(_config_file_error(str(e), value) or _bad_override_value(str(e)) or str(e))
    except (AttributeError, KeyError, TypeError) as e:  # TypeError: a key inside a string
        message = _unknown_override(argv, value) if value is not None else None
        _usage_error(message or f"bad config override: {e}")
    except SyntaxError as e:  # the config file's own Python
        _usage_error(
            f"config file {e.filename}, line {e.lineno}: {e.msg}: {(e.text or '').strip()}"
        )
    else:  # a workdir that is a file, a broken link or not UTF-8: now, not after the setup
        if FLAGS.workdir is not None and (problem := workdir_problem(FLAGS.workdir)):
            _usage_error(f"--workdir {printable(FLAGS.workdir)} {problem}.")
        return rest
    return []  # unreachable: _usage_error exits


def initialize_distributed() -> None:
    """Starts JAX's multi-controller runtime when the flags ask for it (:mod:`.processes`)."""
    # JAX's own heartbeat aborts a process (a C++ stack) when a peer dies: keep it slower than
    # the watchdog, which exits with one line. The shutdown barrier at a normal end waits for
    # peers that all finish together: bound it below JAX's 300 s.
    timeouts = {
        "heartbeat_timeout_seconds": max(100, math.ceil(3 * FLAGS.peer_timeout)),
        "shutdown_timeout_seconds": max(60, math.ceil(2 * FLAGS.peer_timeout)),
    }
    explicit = [FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id]
    if not FLAGS.distributed and all(v is None for v in explicit):
        return
    try:
        local_device_ids = processes.local_ids(FLAGS.local_device_ids)
        if any(v is not None for v in explicit):
            joined = processes.from_flags(*explicit, local_device_ids)
        else:
            joined = processes.from_cluster(local_device_ids, FLAGS.connect_timeout)
        processes.connect(joined, FLAGS.connect_timeout, **timeouts)
    except processes.ProcessSetupError as e:
        _usage_error(str(e))


class _QuietOrbax(logging.Filter):
    """Drops orbax's per-save INFO chatter (dozens of lines per checkpoint); keeps warnings and
    errors, as one line each: a failed background save's tracebacks (one per orbax thread)
    say no more than the :class:`~vision_jax.checkpoint.CheckpointSaveError` that ends the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "/orbax/" not in record.pathname:
            return True
        record.exc_info = record.exc_text = None
        return record.levelno >= logging.WARNING


def _exit(code: int, message: str, watchdog: Any, error: BaseException | None = None) -> None:
    """Ends the process with ``code`` after one line on stderr, skipping the slow teardown of
    the input pipeline's threads.

    Multi-process runs: after a stop request every process is here at the same step, so
    ``jax.distributed``'s shutdown barrier passes at once. After an error that a failed
    collective caused (:func:`_may_mean_a_lost_peer`: a peer died mid-step or mid-save) a peer
    that failed or is lost is named instead, if the watchdog finds one within five heartbeats;
    otherwise the peers are told that this one failed
    (:meth:`~vision_jax.watchdog.PeerWatchdog.fail`) and stop at once.
    """
    import jax

    stopped = code == EXIT_STOPPED
    if watchdog is not None and _may_mean_a_lost_peer(error):
        if lost := watchdog.wait_for_verdict(5 * watchdog.interval):
            watchdog.exit(lost)
    tell(f"vision_jax: {'' if stopped else 'error: '}{message}")
    if watchdog is not None and not stopped:
        watchdog.fail(code, message.splitlines()[0] if message else "")
    if watchdog is not None:
        watchdog.finish()
    if stopped and jax.process_count() > 1:
        jax.distributed.shutdown()
    flush_stdout()
    logging.shutdown()
    os._exit(code)


_PEER_GONE = ("Gloo", "Connection reset by peer", "Connection closed by peer")


def _error_line(error: BaseException) -> str:
    """``error``'s message for the one error line: its type where the message is empty (a bare
    MemoryError) or does not say what it is about (a JSONDecodeError's line and column)."""
    import json

    if not str(error) or isinstance(error, json.JSONDecodeError):
        return type(error).__name__ + (f": {error}" if str(error) else "")
    return str(error)


def _may_mean_a_lost_peer(error: BaseException | None) -> bool:
    """Whether ``error``, or an error that caused it (a failed save's), is a failed collective:
    a JAX runtime error, or the ValueError that CPU collectives (Gloo) raise."""
    from jax.errors import JaxRuntimeError

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, JaxRuntimeError) or any(m in str(error) for m in _PEER_GONE):
            return True
        error = error.__cause__ or error.__context__
    return False


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.distributed or FLAGS.coordinator_address:  # before JAX starts: see abort_notice
        route_stderr(FLAGS.process_id, FLAGS.num_processes)
    import jax

    from vision_jax.signals import StopRequested
    from vision_jax.watchdog import start_watchdog

    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietOrbax())
    if FLAGS.num_cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", FLAGS.num_cpu_devices)
    initialize_distributed()
    configure_dispatch()  # the restart's heap reuse, alone: CPU steps on the calling thread
    configure_compilation_cache(FLAGS.workdir, FLAGS.compilation_cache)
    watchdog = start_watchdog(FLAGS.peer_timeout)
    if jax.process_count() > 1:  # JAX ends a process whose coordinator died with abort():
        faulthandler.disable()  # its one fatal line, without every thread's stack after it
    logging.info(
        "JAX process %d of %d, %d local / %d global devices (%s).",
        jax.process_index(), jax.process_count(), jax.local_device_count(),
        jax.device_count(), jax.devices()[0].platform,
    )  # fmt: skip
    from vision_jax.report import FinalEvaluation
    from vision_jax.train import out_of_memory_advice, train_and_evaluate

    reporting = FLAGS.report and jax.process_count() == 1
    final = FinalEvaluation() if reporting else None  # the report's figures, made as it runs
    try:
        results = train_and_evaluate(
            FLAGS.config, FLAGS.workdir, final=final, exit_on_second_signal=True,
            exit_on_lost_lock=True,
        )  # fmt: skip
    except StopRequested as e:
        _exit(EXIT_STOPPED, str(e), watchdog)
    except (ValueError, RuntimeError, OSError, MemoryError) as e:
        # One line (the _exit's): the traceback only with --verbosity=1
        logging.debug("%s: %s", type(e).__name__, e, exc_info=True)
        advice = out_of_memory_advice(e, FLAGS.config, command_line=True)
        _exit(EXIT_ERROR, _error_line(e) + (f" ({advice})" if advice else ""), watchdog, e)
    except Exception as e:  # a bug: the traceback, then the same bounded exit (the
        # interpreter's teardown would abort while a background compilation still runs)
        logging.exception("%s", type(e).__name__)
        _exit(EXIT_ERROR, f"{type(e).__name__}: {e}", watchdog, e)
    if watchdog is not None:
        watchdog.finish()
    from vision_jax.metrics import json_line

    line = json_line(results)
    logging.info("Final metrics of process %d: %s", jax.process_index(), line)
    if jax.process_index() == 0:
        try:
            print("\n".join([line, *_summaries(results, FLAGS.config.task.name)]), flush=True)
        except BrokenPipeError:  # stdout closed (`| head`): the log has the metrics
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the interpreter's flush at exit)
        if reporting:
            _report(FLAGS.workdir, final)
        elif FLAGS.report:
            logging.info("No report in a multi-process run: python -m vision_jax.report "
                         "--workdir=%s writes it.", FLAGS.workdir)  # fmt: skip
    if jax.process_count() == 1:
        _exit_written()


def _exit_written() -> None:
    """Ends a single-process run that has written everything (checkpoints waited for, event
    files closed, the report saved) without the interpreter's teardown, which spent about a
    second garbage-collecting TensorFlow's and JAX's objects at the end of every command. A
    process of a multi-process run returns instead: JAX's exit handler leaves the coordination
    service in step with its peers."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


def _report(workdir: str, final: Any) -> None:
    """Writes the run's report (from ``final``, the final evaluation's figures, when they are
    of the step it shows); a failure is a warning (the run itself succeeded), a stop signal
    ends the command with one line saying how to write the report again."""
    from vision_jax.report import write_report

    if is_url(workdir):  # (pathlib would write it into a local folder gs:/...)
        logging.warning("No report at the end of training: it is written to a local folder, and "
                        "the workdir %s is a URL: python -m vision_jax.report --workdir=%s "
                        "--output=<local folder> writes it.", workdir, workdir)  # fmt: skip
        return

    def stopped(signum: int, frame: Any) -> None:
        del frame
        tell(f"{signal.Signals(signum).name} while writing the report; the run is saved: "
             f"python -m vision_jax.report --workdir={workdir} writes it.")  # fmt: skip
        flush_stdout()
        os._exit(EXIT_STOPPED)

    previous = take(SIGNALS + defaulted(), stopped)
    try:
        print(f"report: {write_report(workdir, final=final)}")
    except Exception as e:  # the trained model is saved whatever the report hits
        logging.warning("No report written: %s: %s", type(e).__name__, e)
    finally:
        give_back(previous)


def _summaries(results: dict[str, float], task: str) -> list[str]:
    """One line each for the before/after comparison and the best checkpoint, when present."""
    from vision_jax.tasks import TASKS

    headline = TASKS[task].headline
    library = [n for n in HEADLINES if issubclass(TASKS[task], TASKS[n])]
    words = library and headline == TASKS[library[0]].headline
    name = HEADLINES[library[0]] if words else headline
    examples = int(results.get("eval/examples", 0))
    if f"eval/{headline}" not in results:  # (a run whose task's summarize left it out)
        logging.warning("No eval/%s (the task's headline) in the results: no summary of it.",
                        headline)  # fmt: skip
        return []
    lines = []
    if f"eval_before/{headline}" in results:
        lines.append(
            f"{name} before fine-tuning {results[f'eval_before/{headline}']:.4f}, after "
            f"{results[f'eval/{headline}']:.4f} ({examples} examples)"
        )
    best = [k for k in results if k.startswith("best/") and k != "best/step"]
    if best:
        metric = best[0].removeprefix("best/")
        # The parameters the selection measured: predict, report and export read those.
        ema = "_ema/" in metric and f"eval_ema/{headline}" in results
        final = results[f"eval_ema/{headline}" if ema else f"eval/{headline}"]
        lines.append(
            f"best checkpoint: step {int(results['best/step'])} ({metric} {results[best[0]]:.4f});"
            f" its {name}{' (EMA parameters)' if ema else ''} on the eval split {final:.4f} "
            f"({examples} examples)"
        )
    return lines


if __name__ == "__main__":
    restart_for_xla_buffers()  # may start again: host memory for XLA's buffers
    app.run(main, flags_parser=parse_flags)
