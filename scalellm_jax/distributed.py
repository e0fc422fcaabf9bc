"""Multi-process (multi-host) start-up: one process per host, all running the same command.

Every process calls :func:`initialize_from_env` before it touches JAX. With the variables below
set, it joins the processes into one JAX runtime (``jax.distributed.initialize``): afterwards
``jax.devices()`` lists the devices of *all* processes, a mesh built by
``scalellm_jax.parallel.build_mesh`` spans the hosts, and ``scalellm_jax.load`` places on each
process only the shards of its own devices.

``SCALELLM_COORDINATOR``    host:port of process 0's coordinator service (reachable from every host)
``SCALELLM_NUM_PROCESSES``  number of processes (usually hosts)
``SCALELLM_PROCESS_ID``     this process's rank, 0 … num_processes - 1

Without ``SCALELLM_COORDINATOR`` nothing happens (single-process run). ``SCALELLM_COORDINATOR=auto``
lets JAX detect the cluster itself (Slurm, Open MPI, Kubernetes, Cloud TPU).

On CPU the cross-process collectives go through gloo (``jax_cpu_collectives_implementation``,
the default in jax 0.10; set here when it is unset, since without it a multi-process CPU program
has no collectives). GPUs use NCCL and need nothing extra.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping

import jax

from scalellm_jax.config import ConfigError

logger = logging.getLogger(__name__)

COORDINATOR, NUM_PROCESSES, PROCESS_ID = "SCALELLM_COORDINATOR", "SCALELLM_NUM_PROCESSES", "SCALELLM_PROCESS_ID"
AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Where the coordinator is and who this process is; ``coordinator == "auto"``: ask JAX."""

    coordinator: str
    num_processes: int | None = None
    process_id: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DistributedConfig | None:
        """The config the ``SCALELLM_*`` variables describe, or None when ``SCALELLM_COORDINATOR`` is unset."""
        env = os.environ if env is None else env
        coordinator = env.get(COORDINATOR, "").strip()
        if not coordinator:
            return None
        if coordinator == AUTO:
            return cls(AUTO)
        if ":" not in coordinator:
            raise ConfigError(f"{COORDINATOR} must be host:port (or 'auto'), got {coordinator!r}")
        num, rank = _int_var(env, NUM_PROCESSES, 1), _int_var(env, PROCESS_ID, 0)
        if rank >= num:
            raise ConfigError(f"{PROCESS_ID} {rank} must be below {NUM_PROCESSES} ({num})")
        return cls(coordinator, num, rank)


def _int_var(env: Mapping[str, str], name: str, minimum: int) -> int:
    raw = env.get(name)
    if raw is None:
        raise ConfigError(f"{COORDINATOR} is set, so {name} must be set too")
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def initialize(config: DistributedConfig, timeout_s: int = 300) -> None:
    """Join the JAX runtime of ``config``; must run before any JAX computation in this process."""
    if not jax.config.jax_cpu_collectives_implementation:  # keep an explicit choice such as "mpi"
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if config.coordinator == AUTO:
        jax.distributed.initialize(initialization_timeout=timeout_s)
    else:
        jax.distributed.initialize(
            config.coordinator, num_processes=config.num_processes, process_id=config.process_id,
            initialization_timeout=timeout_s,
        )
    logger.info(
        "process %d of %d: %d local of %d devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )


def initialize_from_env(env: Mapping[str, str] | None = None, timeout_s: int = 300) -> bool:
    """:func:`initialize` from the ``SCALELLM_*`` variables; False (and nothing done) when unset."""
    config = DistributedConfig.from_env(env)
    if config is None:
        return False
    initialize(config, timeout_s)
    return True


def is_coordinator() -> bool:
    """True on process 0, the one that should own side effects such as an HTTP server or result files."""
    return jax.process_index() == 0
