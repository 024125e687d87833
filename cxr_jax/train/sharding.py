"""Device mesh and shardings: data parallelism over ('data', 'fsdp'), optional FSDP params.

Batches are split along their first axis over every device of the mesh. Parameters
and optimizer state are replicated unless `fsdp` > 1, in which case each array of at
least `fsdp_min_size` elements is split along its largest axis that the fsdp axis
divides; XLA inserts the gathers. Losses computed on the global batch arrays see the
whole batch across devices and hosts.
"""

import os
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

BATCH_AXES = ('data', 'fsdp')


def make_mesh(fsdp: int = 1, num_devices: int = 0) -> Mesh:
  """Mesh over all devices, or the first `num_devices` (single-process runs only)."""
  devices = jax.devices()
  if num_devices:
    if jax.process_count() > 1 or num_devices > len(devices):
      raise ValueError(f'mesh.devices={num_devices}: needs a single process with at least '
                       f'that many devices (have {len(devices)} in {jax.process_count()} '
                       'processes).')
    devices = devices[:num_devices]
  if len(devices) % fsdp:
    raise ValueError(f'mesh.fsdp={fsdp} does not divide the {len(devices)} devices.')
  return Mesh(np.array(devices).reshape(len(devices) // fsdp, fsdp), BATCH_AXES)


def check_batch_size(batch_size: int, devices: int, field: str = 'batch_size') -> None:
  """Raises ValueError naming `field` unless the batch splits evenly over the `devices`
  a run's batch is sharded over (jax's own IndivisibleError names neither the setting
  nor the fix)."""
  if batch_size <= 0 or batch_size % devices:
    below = batch_size // devices * devices
    valid = [size for size in (below, below + devices) if size > 0]
    raise ValueError(f'{field}={batch_size} does not split over the {devices} devices of '
                     f'this run: it must be a multiple of {devices} (e.g. '
                     f'{" or ".join(map(str, valid))}).')


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_shardings(abstract_state: Any, mesh: Mesh, fsdp_min_size: int = 2**18) -> Any:
  """A sharding per leaf of `abstract_state` (shapes only), by the FSDP rule above."""
  fsdp = mesh.shape['fsdp']

  def rule(leaf):
    shape = getattr(leaf, 'shape', ())
    if fsdp == 1 or np.prod(shape, dtype=np.int64) < fsdp_min_size:
      return replicated(mesh)
    for axis in np.argsort(shape)[::-1]:
      if shape[axis] % fsdp == 0:
        spec = [None] * len(shape)
        spec[axis] = 'fsdp'
        return NamedSharding(mesh, P(*spec))
    return replicated(mesh)

  return jax.tree.map(rule, abstract_state)


def initialize_distributed() -> None:
  """Joins a multi-host cluster when the environment describes one (TPU pods, SLURM).

  jax.distributed.initialize() finds coordinator and process ids itself on Cloud TPU
  and under SLURM; JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set
  them explicitly (e.g. several GPU machines, or processes on one host in tests).
  """
  explicit = 'JAX_COORDINATOR_ADDRESS' in os.environ
  on_cluster = explicit or 'SLURM_JOB_ID' in os.environ or 'TPU_WORKER_HOSTNAMES' in os.environ
  if not on_cluster or jax.distributed.is_initialized():
    return
  if explicit:
    jax.distributed.initialize(
        coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
        num_processes=int(os.environ['JAX_NUM_PROCESSES']),
        process_id=int(os.environ['JAX_PROCESS_ID']))
  else:
    jax.distributed.initialize()
