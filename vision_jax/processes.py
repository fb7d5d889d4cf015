"""Joining a multi-process run: where the processes meet (the coordinator flags, or the cluster
environment JAX reads for ``--distributed``), checked before JAX connects, and a connection
that does not come about in time ended with one line.

JAX's own failures here are a traceback (a cluster variable that is no number, no cluster
found), a crash (a coordinator port another program holds) or an abort with a C++ stack (a
process that never joins): each becomes one line naming the flag, the variable or the port.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
from collections.abc import Sequence

from vision_jax.watchdog import EXIT_PEER_LOST

# The environment variables JAX's cluster detection reads, by cluster (for the messages).
_VARIABLES = {
    "slurm": ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
              "SLURM_LOCALID"),
    "ompi": ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
             "OMPI_COMM_WORLD_LOCAL_RANK"),
}  # fmt: skip


class ProcessSetupError(ValueError):
    """The processes' meeting point is missing or wrong (a usage error: exit status 2)."""


@dataclasses.dataclass(frozen=True)
class Processes:
    """Where a multi-process run's processes meet, and this process's place among them.
    The ``*_name`` fields say where the index, count and coordinator came from (a flag, or a
    cluster's variable); ``other_port``: how to choose another coordinator port."""

    coordinator: str
    count: int
    index: int
    local_device_ids: list[int] | None
    index_name: str = "--process_id"
    count_name: str = ""
    coordinator_name: str = "--coordinator_address"
    other_port: str = "Choose another port (launch/local.sh -p)."

    @property
    def port(self) -> str:
        return self.coordinator.rpartition(":")[2]

    @property
    def loopback(self) -> bool:
        """Whether every process runs on this machine (the coordinator then binds 127.0.0.1)."""
        return self.coordinator.rpartition(":")[0] in ("127.0.0.1", "localhost")


def from_flags(
    coordinator: str | None, count: int | None, index: int | None,
    local_device_ids: list[int] | None,
) -> Processes:  # fmt: skip
    """The explicit coordinator flags (all three, or none: then this is not called)."""
    if coordinator is None or count is None or index is None:
        raise ProcessSetupError(
            "--coordinator_address, --num_processes and --process_id go together."
        )
    return _checked(Processes(coordinator, count, index, local_device_ids))


def from_cluster(local_device_ids: list[int] | None, timeout: float) -> Processes:
    """``--distributed``: what JAX's cluster detection (SLURM, Cloud TPU, Open MPI, Kubernetes)
    reads from this process's environment, as :func:`jax.distributed.initialize` would
    (``timeout``: how long a TPU worker waits for worker 0's address to resolve)."""
    name = _detected_cluster()
    if local_device_ids is None and os.environ.get("JAX_LOCAL_DEVICE_IDS"):
        local_device_ids = local_ids(os.environ["JAX_LOCAL_DEVICE_IDS"].split(","),
                                     "JAX_LOCAL_DEVICE_IDS")  # fmt: skip
    coordinator, count, index, local_device_ids = _read_cluster(name, local_device_ids, timeout)
    slurm = name == "slurm"
    given = bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))  # JAX takes it over the cluster's
    return _checked(Processes(
        coordinator, count, index, local_device_ids,
        index_name="SLURM_PROCID" if slurm else f"{name}'s process id",
        count_name="SLURM_NTASKS" if slurm else "",
        coordinator_name="JAX_COORDINATOR_ADDRESS" if given else f"The {name} coordinator address",
        other_port="Choose another port in JAX_COORDINATOR_ADDRESS." if given
        else "Set JAX_COORDINATOR_PORT to another port.",
    ))  # fmt: skip


def _detected_cluster() -> str:
    """The name of the cluster JAX detects here (or JAX_COORDINATOR_ADDRESS, when only that is
    set); raises when there is none."""
    from jax._src import clusters  # JAX's detection itself, to check what it finds first

    env = next(
        (e for e in clusters.ClusterEnv._cluster_types
         if not e.opt_in_only_method and e.is_env_present()),
        None,
    )  # fmt: skip
    if env is not None:
        return env.name or env.__name__  # (Kubernetes' has no name)
    if "SLURM_JOB_ID" in os.environ:  # e.g. run in a batch script without srun
        missing = [v for v in _VARIABLES["slurm"] if v not in os.environ]
        raise ProcessSetupError(
            f"--distributed in SLURM job {os.environ['SLURM_JOB_ID']} without "
            f"{', '.join(missing)}: start the processes with srun (launch/slurm_gpu.sbatch)."
        )
    if not os.environ.get("JAX_COORDINATOR_ADDRESS"):
        raise ProcessSetupError(
            "--distributed found no cluster in this process's environment (SLURM, Cloud TPU, "
            "Open MPI, Kubernetes): start it with srun or on every TPU worker, or on one "
            "machine with launch/local.sh."
        )
    return "JAX_COORDINATOR_ADDRESS"


def _read_cluster(
    name: str, local_device_ids: list[int] | None, timeout: float
) -> tuple[str, int, int, list[int] | None]:
    """The coordinator, process count and index, and local devices JAX reads for ``name``."""
    from jax._src import clusters

    variables = _VARIABLES.get(name, ())
    for variable in variables:
        if variable not in os.environ:
            raise ProcessSetupError(f"--distributed: {variable} is not set ({name}).")
    try:
        coordinator, count, index, local_device_ids = (
            clusters.ClusterEnv.auto_detect_unset_distributed_params(
                os.environ.get("JAX_COORDINATOR_ADDRESS"), None, None, local_device_ids,
                None, int(timeout),
            )
        )  # fmt: skip
    except (KeyError, ValueError, RuntimeError) as e:  # RuntimeError: TPU worker 0 not found
        shown = "".join(f", {v}={os.environ[v]!r}" for v in variables).replace(", ", ": ", 1)
        raise ProcessSetupError(
            f"--distributed cannot read the {name} environment ({e}){shown}."
        ) from e
    if count is None or index is None:
        raise ProcessSetupError(f"--distributed: {name} does not say how many processes run and "
                                "which this is.")  # fmt: skip
    return coordinator, count, index, local_device_ids


def _checked(processes: Processes) -> Processes:
    """Raises for an index out of range or a coordinator that is not HOST:PORT."""
    count, index = processes.count, processes.index
    if not 0 <= index < count:
        counted = f"; {processes.count_name}={count}" if processes.count_name else ""
        raise ProcessSetupError(
            f"{processes.index_name}={index} is not one of the {count} processes "
            f"(0 to {count - 1}{counted})."
        )
    port = processes.port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ProcessSetupError(f"{processes.coordinator_name} needs HOST:PORT; got "
                                f"{processes.coordinator!r}.")  # fmt: skip
    return processes


def _check_port_free(processes: Processes) -> None:
    """Raises naming the coordinator's port when another program holds it here (JAX's
    coordinator would crash the process without saying why). Process 0 only."""
    host = "127.0.0.1" if processes.loopback else "0.0.0.0"
    with socket.socket() as probe:  # as gRPC binds: a port in TIME_WAIT (a run just ended) is free
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, int(processes.port)))
        except OSError as e:
            raise ProcessSetupError(
                f"The coordinator cannot listen on port {processes.port} here ({e.strerror}): "
                f"another run's coordinator? {processes.other_port}"
            ) from e


def connect(processes: Processes, timeout: float, **timeouts: int) -> None:
    """:func:`jax.distributed.initialize` with ``processes``; when they have not all connected
    within ``timeout`` seconds, exits with one line (status 69) before JAX aborts with its
    stack. ``timeouts``: JAX's heartbeat and shutdown timeouts."""
    import jax

    if processes.index == 0:
        _check_port_free(processes)
    timer = threading.Timer(timeout, _not_connected, (processes, timeout))
    timer.daemon = True
    timer.start()
    try:
        jax.distributed.initialize(
            coordinator_address=processes.coordinator,
            num_processes=processes.count,
            process_id=processes.index,
            coordinator_bind_address=f"127.0.0.1:{processes.port}" if processes.loopback else None,
            local_device_ids=processes.local_device_ids,
            initialization_timeout=int(timeout) + 60,  # ours ends it first, with one line
            **timeouts,
        )
    finally:
        timer.cancel()


def _not_connected(processes: Processes, timeout: float) -> None:
    waited = f"{timeout:g} s"
    if processes.index == 0:
        message = (f"Not all {processes.count} processes connected to this coordinator (port "
                   f"{processes.port}) within {waited}: were they all started?")  # fmt: skip
    else:
        message = (f"Process {processes.index} could not join the coordinator at "
                   f"{processes.coordinator} within {waited}: is process 0 running, and its "
                   "port reachable from here?")  # fmt: skip
    print(f"vision_jax: error: {message}", file=sys.stderr, flush=True)
    os._exit(EXIT_PEER_LOST)


def local_ids(ids: Sequence[str] | None, source: str = "--local_device_ids") -> list[int] | None:
    """``--local_device_ids`` (or the variable ``source``) as integers."""
    if ids is None:
        return None
    try:
        return [int(i) for i in ids]
    except ValueError as e:
        raise ProcessSetupError(f"{source} takes integers, e.g. 0,1,2,3; got "
                                f"{','.join(ids)!r}.") from e  # fmt: skip
