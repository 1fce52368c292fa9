"""PartiStrategy: the thin Lightning adapter around a partition plan.

It owns the process group and the named device mesh, applies the plan to the user's module (the
parallel math lives in ``parti_lightning.parallel``), and routes the collectives Lightning asks for
over the data-parallel group, so logged values and metrics are never over-counted by model-parallel
replicas.
"""

from __future__ import annotations

import inspect
import logging
import shutil
import sys
import zlib
from collections.abc import Generator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any, Literal, Union

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.distributed import (
    _all_gather_ddp_if_available,
    _distributed_is_initialized,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from lightning_fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer
from typing_extensions import override

from parti_lightning.accelerator import PartiAccelerator, release_freed_memory
from parti_lightning.autoplan import StepMeter, choose_on_rank0, plan_for, training_batch
from parti_lightning.checkpoint import (
    CheckpointError,
    checkpoint_kind,
    is_sharded_checkpoint,
    load_sharded,
    named_optimizer_state,
    restore_rng_state,
    save_sharded,
    sharded_model_state,
    sharded_optimizer_state,
)
from parti_lightning.compat import check_callbacks
from parti_lightning.launchers import PartiMultiProcessingLauncher, PartiSubprocessScriptLauncher
from parti_lightning.network import init_dist_connection, restore_backend_interfaces, track_mesh
from parti_lightning.parallel.batchnorm import PartiSyncBatchNorm
from parti_lightning.parallel.blocks import resolve_units
from parti_lightning.parallel.checkpointing import apply_activation_checkpointing
from parti_lightning.parallel.data import GradientSynchronizer
from parti_lightning.parallel.storage import (
    apply_storage,
    full_optimizer_state_dict,
    full_state_dict,
    load_full_optimizer_state_dict,
    load_full_state_dict,
    retarget_lr_scheduler,
    root_free_units,
    shard_optimizer,
)
from parti_lightning.plan import AUTO, PRESETS, PartitionPlan, PlanLike
from parti_lightning.planner import PlanReport

log = logging.getLogger(__name__)

StartMethod = Literal["popen", "spawn", "fork", "forkserver"]
StateDictType = Literal["auto", "sharded", "full"]
_BACKENDS = ("gloo", "nccl")


class PartiStrategy(ParallelStrategy):
    """Partitioned training for an unmodified LightningModule.

    Args:
        plan: how to partition: a preset name (``"auto"``, ``"ddp"``, ``"zero1"``, ...), a mapping of
            :class:`~parti_lightning.PartitionPlan` fields, or a plan.
        process_group_backend: ``"gloo"`` or ``"nccl"``; default gloo on CPU, nccl on CUDA.
        timeout: how long a collective during the run (training, validation, checkpointing) may wait
            for the other ranks before the run fails, in seconds or as a ``timedelta``. A rank that
            hangs makes the others fail after this long. Default 10 minutes.
        startup_timeout: how long start-up may wait for every rank to join (process-group
            rendezvous, building the mesh, ``plan="auto"`` choosing on rank 0). Default 30 minutes:
            ranks of a multi-node job may start minutes apart.
        start_method: ``"popen"`` re-runs the script per rank (``python train.py``); ``"spawn"`` or
            ``"fork"`` start workers from a running interpreter (notebooks). Under torchrun or SLURM
            the processes already exist and nothing is launched.
        memory_budget: bytes one rank may use, for ``plan="auto"``; default the device's: the GPU's memory,
            or on CPU the machine's memory over the ranks of a node.
        planner_headroom: fraction of ``memory_budget`` that ``plan="auto"`` keeps free for what its
            prediction does not see (allocator slack, data loading, logging).
        state_dict_type: how checkpoints are written. ``"auto"``: ``"full"`` where one rank holds the
            whole model anyway (ddp, zero1), ``"sharded"`` where the parameters are sharded (zero2, zero3,
            hybrid). ``"sharded"``: a directory written by every rank through ``torch.distributed.checkpoint``
            (each rank writes what it holds; no rank gathers the model), atomically, loadable under any plan
            or world size; ``parti-lightning convert`` turns it into a single file. ``"full"``: one plain
            Lightning file gathered on rank 0. Either kind loads under any plan.
        accelerator: the device partitions; default :class:`~parti_lightning.PartiAccelerator`.
        parallel_devices: devices of this node (normally set by the Trainer).
        cluster_environment: normally detected by the Trainer (torchrun, SLURM, ...).
        checkpoint_io: how checkpoints are written.
        precision_plugin: normally set by the Trainer from ``precision=``.
    """

    strategy_name = "parti"

    def __init__(
        self,
        plan: PlanLike = "auto",
        process_group_backend: Literal["gloo", "nccl"] | None = None,
        timeout: Union[float, timedelta] = 600.0,
        startup_timeout: Union[float, timedelta] = 1800.0,
        start_method: StartMethod = "popen",
        state_dict_type: StateDictType = "auto",
        memory_budget: int | None = None,
        planner_headroom: float = 0.1,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        # Validate everything that needs no processes now, so a bad argument fails before launch.
        # "auto" runs as replicated data parallel until the planner, which needs the module and a batch,
        # chooses in `setup`.
        self._auto = isinstance(plan, str) and plan.strip().lower() == AUTO
        if isinstance(plan, Mapping) and str(plan.get("preset", "")).strip().lower() == AUTO:
            raise ValueError(
                f"plan={dict(plan)!r}: the planner chooses every field of an 'auto' plan; give plan='auto' alone,"
                " or a preset (ddp, zero1, zero2, zero3, hybrid) with your fields."
            )
        self.plan = PartitionPlan.from_value(plan)
        if memory_budget is not None and (not isinstance(memory_budget, int) or memory_budget <= 0):
            raise ValueError(f"memory_budget={memory_budget!r}: give a positive number of bytes per rank, or None.")
        if not 0 <= planner_headroom < 1:
            raise ValueError(f"planner_headroom={planner_headroom!r}: the fraction kept free, in [0, 1).")
        self._memory_budget = memory_budget
        self._planner_headroom = planner_headroom
        self.plan_report: PlanReport | None = None  # the planner's choice and reasons (global rank 0, plan="auto")
        self._step_meter: StepMeter | None = None
        if process_group_backend is not None and process_group_backend not in _BACKENDS:
            raise ValueError(f"process_group_backend={process_group_backend!r}: choose one of {_BACKENDS} or None.")
        self._process_group_backend = process_group_backend
        self._timeout = _positive_timedelta("timeout", timeout)
        self._startup_timeout = _positive_timedelta("startup_timeout", startup_timeout)
        self._start_method = start_method
        if state_dict_type not in ("auto", "sharded", "full"):
            raise ValueError(f"state_dict_type={state_dict_type!r}: choose 'auto', 'sharded' or 'full'.")
        self._requested_state_dict_type = state_dict_type
        self._restored_sharded = False  # the last `load_checkpoint` already restored model and optimizers
        self._num_nodes = 1
        self.mesh: DeviceMesh | None = None
        self._dp_group: ProcessGroup | None = None
        self._grad_sync: GradientSynchronizer | None = None
        # Read every step (sampler, backward sync): resolved once, again only if the world changes.
        self._resolved: tuple[tuple[int, int], PartitionPlan] | None = None
        self._redirect_steps = False  # steps go through the FSDP root's `__call__` (ZeRO-2/3, automatic optimization)

    # ------------------------------------------------------------------ devices and ranks

    @property
    @override
    def accelerator(self) -> Accelerator | None:
        return self._accelerator

    @accelerator.setter
    def accelerator(self, accelerator: Accelerator | None) -> None:
        # The Trainer hands us its stock CPU/CUDA accelerator when none was asked for; ours is the
        # default, as it pins CPU ranks to their own cores.
        self._accelerator = PartiAccelerator.from_lightning(accelerator) if accelerator is not None else None

    @property
    def is_distributed(self) -> bool:
        # Lightning reads this from custom strategies to decide on distributed samplers.
        return True

    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def process_group_backend(self) -> str:
        if self._process_group_backend is not None:
            return self._process_group_backend
        device_type = self.parallel_devices[0].type if self.parallel_devices else "cpu"
        return "nccl" if device_type == "cuda" else "gloo"

    @property
    def _state_dict_type(self) -> str:
        return checkpoint_kind(self._requested_state_dict_type, self.resolved_plan)

    @property
    def plans_automatically(self) -> bool:
        """Whether the planner chooses the plan (``plan="auto"``) when ``fit`` sets up."""
        return self._auto

    @property
    def memory_budget(self) -> int | None:
        """The per-rank budget ``plan="auto"`` plans for; ``None``: the device's."""
        return self._memory_budget

    @property
    def planner_headroom(self) -> float:
        return self._planner_headroom

    @property
    def resolved_plan(self) -> PartitionPlan:
        """The plan with its degrees fixed for this world size (resolved once per world shape)."""
        shape = (self.num_nodes * self.num_processes, self.num_processes)
        if self._resolved is None or self._resolved[0] != shape:
            self._resolved = (shape, self.plan.resolve(shape[0], ranks_per_node=shape[1]))
        return self._resolved[1]

    @property
    def data_parallel_rank(self) -> int:
        # Mesh axes are (data, shard, tensor, pipeline), outermost first: ranks that differ only in
        # their tensor or pipeline coordinate are consecutive and share a data-parallel rank.
        plan = self.resolved_plan
        return self.global_rank // (plan.tensor * plan.pipeline)

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.resolved_plan.data_parallel_size, "rank": self.data_parallel_rank}

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = fabric_rank_zero_only.rank = self.global_rank

    # ------------------------------------------------------------------ launch

    @override
    def _configure_launcher(self) -> None:
        # Called while the Trainer is built, before any process starts: the last moment to refuse.
        self._validate_before_launch()
        assert self.cluster_environment is not None
        if self._start_method == "popen":
            self._launcher = PartiSubprocessScriptLauncher(
                self.cluster_environment, self.num_processes, self.num_nodes, before_launch=self._validate_model
            )
        else:
            self._launcher = PartiMultiProcessingLauncher(
                self, start_method=self._start_method, before_launch=self._validate_model
            )

    def _validate_before_launch(self) -> None:
        if isinstance(self.accelerator, PartiAccelerator):
            self.accelerator.check_devices(self.num_processes)
        device_type = self.parallel_devices[0].type if self.parallel_devices else "cpu"
        backend = self.process_group_backend
        if backend == "nccl" and device_type != "cuda":
            raise ValueError(
                f"process_group_backend='nccl' needs CUDA devices, but this run is on {device_type}:"
                " use 'gloo' (or leave it unset)."
            )
        if not dist.is_available() or not dist.is_backend_available(backend):
            raise ValueError(f"process_group_backend={backend!r} is not available in this build of torch.")
        plan = self.resolved_plan  # raises PlanError when the mesh does not fit the world size
        if plan.activation_checkpointing == "auto":
            raise NotImplementedError(
                "plan.activation_checkpointing='auto' is decided by the planner only with plan='auto': with a"
                " fixed plan, use 'blocks' or 'none'."
            )
        if plan.storage != "replicated" and plan.shard == 1:
            rank_zero_info(
                f"parti: storage={plan.storage!r} over shard=1 rank shards nothing; training replicated."
            )
        if self.plan.offload == "cpu" and device_type == "cpu":
            rank_zero_info("parti: offload='cpu' on a CPU run keeps storage where it already is (no effect).")

    def _validate_model(self, trainer: Trainer | None = None) -> None:
        """Checks that need the user's module, run by the launcher before it starts any process."""
        module = self.lightning_module
        if module is None:
            return
        check_callbacks(trainer.callbacks if trainer is not None else [], self.resolved_plan)
        units = []
        if self.plan.sharding_units is not None or self.plan.activation_checkpointing == "blocks":
            units = resolve_units(module, self.plan.sharding_units)  # names an unknown unit clearly
        if self._shards_module and not module.automatic_optimization:
            try:
                root_free_units(module, units)
            except ValueError as err:
                raise NotImplementedError(
                    f"manual optimization with plan storage={self.plan.storage!r} is not supported for this"
                    f" module: {err} Use storage='optimizer' (ZeRO-1) or 'replicated'."
                ) from err

    # ------------------------------------------------------------------ process group and mesh

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        if isinstance(self.accelerator, PartiAccelerator):
            partition = self.accelerator.setup_partition(
                self.root_device, self.local_rank, self.num_processes, sharded=self._shards_module
            )
            log.info(f"rank {self.global_rank}: partition {partition}")
        self._setup_distributed()

    def _setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        assert self.cluster_environment is not None
        device_id = self.root_device if self.root_device.type == "cuda" else None
        # Not Lightning's `_init_dist_connection`: on one node (MASTER_ADDR loopback) the store and the
        # collectives listen on loopback only, where torch's env:// would listen on every interface.
        init_dist_connection(
            self.cluster_environment, self.process_group_backend, timeout=self._startup_timeout, device_id=device_id
        )
        self._build_mesh(self.resolved_plan)
        rank_zero_info(f"parti: {self.world_size} processes joined ({self.process_group_backend})")

    def _build_mesh(self, plan: PartitionPlan) -> None:
        self.mesh = init_device_mesh(
            self.root_device.type, (plan.data, plan.shard), mesh_dim_names=("data", "shard")
        )
        track_mesh(self.mesh)
        self._dp_group = self._data_parallel_group(self.mesh, plan)
        self._use_run_timeout()

    def _use_run_timeout(self) -> None:
        """Every rank has joined: from now on a collective waits `timeout`, not `startup_timeout`."""
        dist.barrier()
        self._set_group_timeouts(self._timeout)

    def _set_group_timeouts(self, timeout: timedelta) -> None:
        assert self.mesh is not None
        groups = {id(g): g for g in (dist.group.WORLD, self._dp_group, *self.mesh.get_all_groups()) if g is not None}
        for group in groups.values():
            # torch fixes a group's timeout when it is created and offers only this (private) setter.
            dist.distributed_c10d._set_pg_timeout(timeout, group)

    @staticmethod
    def _data_parallel_group(mesh: DeviceMesh, plan: PartitionPlan) -> ProcessGroup:
        if plan.shard == 1:
            return mesh["data"].get_group()
        if plan.data == 1:
            return mesh["shard"].get_group()
        return mesh["data", "shard"]._flatten("data_shard").get_group()

    @property
    def data_parallel_group(self) -> ProcessGroup | None:
        """The group over which batches differ: Lightning's reductions and the sampler use it."""
        return self._dp_group

    # ------------------------------------------------------------------ applying the plan

    @override
    def setup(self, trainer: Trainer) -> None:
        assert self.accelerator is not None
        assert self.model is not None
        self.accelerator.setup(trainer)
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting and self._auto and self._step_meter is None:  # planned once per strategy
            self._choose_plan(trainer)
        plan = self.resolved_plan
        check_callbacks(trainer.callbacks, plan)  # again: plan="auto" chose only now
        rank_zero_info(f"parti: plan {plan.describe()}")
        if fitting and self._layer_sync is not None:
            # Lightning's TorchSyncBatchNorm refuses CPU tensors; ours runs on both, over the DP group.
            self._layer_sync = PartiSyncBatchNorm(self._dp_group, use_torch=self.process_group_backend == "nccl")
            self.model = self._layer_sync.apply(self.model)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if not _is_sharded(self.model):
            # Every replica starts from rank 0's weights, whatever each process initialized. (A module
            # still sharded by an earlier `fit` is consistent already: its shards are its state.)
            _sync_module_states(self.model)
        if fitting:
            self._apply_plan(plan)
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _choose_plan(self, trainer: Trainer) -> None:
        """``plan="auto"``: the planner chooses on global rank 0, every rank takes its choice."""
        assert self.lightning_module is not None
        budget = self._memory_budget
        if budget is None:
            assert isinstance(self.accelerator, PartiAccelerator), "plan='auto' needs the PartiAccelerator"
            budget = self.accelerator.memory_budget
        module, device_type = self.lightning_module, self.root_device.type
        # Planning is start-up: the other ranks wait while rank 0 profiles the model and, on a machine
        # it has not seen, measures it (seconds), which a short run `timeout` must not cut off.
        self._set_group_timeouts(self._startup_timeout)
        try:
            chosen, report = choose_on_rank0(
                lambda: plan_for(
                    module, training_batch(trainer, module), device_type, budget, self.world_size,
                    self.num_processes, self._planner_headroom,
                )
            )
        finally:
            self._set_group_timeouts(self._timeout)
        if report is not None:
            self.plan_report = report
            rank_zero_info(f"parti: plan='auto' chose {report.chosen.describe()}\n{report.render()}")
        previous = self.resolved_plan
        self.plan, self._resolved = chosen, None
        plan = self.resolved_plan
        if (plan.data, plan.shard) != (previous.data, previous.shard):
            self._build_mesh(plan)
        if self._shards_module and self.root_device.type == "cpu":
            release_freed_memory()  # as the accelerator does for a sharded plan known at launch
        estimate = next((c.estimate for c in report.candidates if c.chosen), None) if report is not None else None
        self._step_meter = StepMeter(
            "plan='auto'", estimate.peak_bytes if estimate else 0, estimate.seconds if estimate else 0.0,
            self.root_device,
        )

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self._step_meter is not None and optimizer is self.optimizers[0]:
            self._step_meter.step()
        return output

    @property
    def _shards_module(self) -> bool:
        """ZeRO-2/3: FSDP owns the parameters and reduces the gradients."""
        plan = self.resolved_plan
        return plan.storage in ("gradients", "parameters") and plan.shard > 1

    @property
    def _shards_optimizer(self) -> bool:
        plan = self.resolved_plan
        return plan.storage == "optimizer" and plan.shard > 1

    def _apply_plan(self, plan: PartitionPlan) -> None:
        # Order as in DESIGN.md: (pipeline, tensor,) activation checkpointing, then storage, and all
        # before the optimizers are built, since FSDP replaces the parameters they would hold.
        assert self.model is not None
        assert self.mesh is not None and self._dp_group is not None
        if plan.activation_checkpointing == "blocks":
            apply_activation_checkpointing(self.model, resolve_units(self.model, plan.sharding_units))
        if self._shards_module:
            # Automatic optimization runs each step through the module's `__call__` (see `_call_step`),
            # so the root can be a unit; manual optimization runs backward passes inside
            # `training_step`, before any root forward would end, so only the children are units.
            shard_root = self.lightning_module is not None and self.lightning_module.automatic_optimization
            apply_storage(self.model, self.mesh, plan, shard_root=shard_root)
            self._redirect_steps = shard_root
        else:
            # Replicated and ZeRO-1 keep whole parameters: gradients are averaged over every
            # data-parallel rank (ZeRO-1 then splits only the optimizer step).
            self._grad_sync = GradientSynchronizer(self.model, self._dp_group)

    def _step(self, method: str, context: Any, *args: Any, **kwargs: Any) -> Any:
        if not self._redirect_steps:
            return getattr(super(), method)(*args, **kwargs)
        # FSDP gathers a unit's parameters in hooks around its `forward`, but Lightning calls
        # `training_step` & co. directly: route them through the module's `__call__` so the root's
        # hooks run (Lightning's forward redirection, with the module as its own wrapper).
        module = self.lightning_module
        assert module is not None
        with context():
            return self._forward_redirection(module, module, method, *args, **kwargs)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._step("training_step", self.precision_plugin.train_step_context, *args, **kwargs)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._step("validation_step", self.precision_plugin.val_step_context, *args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._step("test_step", self.precision_plugin.test_step_context, *args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._step("predict_step", self.precision_plugin.predict_step_context, *args, **kwargs)

    @override
    def setup_optimizers(self, trainer: Trainer) -> None:
        super().setup_optimizers(trainer)
        if not self._shards_optimizer:
            return
        assert self.mesh is not None
        shard_group = self.mesh["shard"].get_group()
        sharded = []
        for optimizer in self.optimizers:
            replacement = shard_optimizer(optimizer, shard_group)
            for config in self.lr_scheduler_configs:
                if getattr(config.scheduler, "optimizer", None) is optimizer:
                    retarget_lr_scheduler(config.scheduler, replacement)
            sharded.append(replacement)
        self.optimizers = sharded

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    @override
    def post_backward(self, closure_loss: Tensor) -> None:
        if self._grad_sync is not None:
            self._grad_sync.sync()

    @contextmanager
    @override
    def block_backward_sync(self) -> Generator[None, None, None]:
        if self._grad_sync is not None:
            with self._grad_sync.no_sync():
                yield
        elif self._shards_module and hasattr(self.model, "set_requires_gradient_sync"):
            # FSDP: accumulate unsharded local gradients, reduce-scatter at the boundary step.
            self.model.set_requires_gradient_sync(False)  # type: ignore[operator]
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)  # type: ignore[operator]
        else:
            yield

    # ------------------------------------------------------------------ checkpoints

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        if self._state_dict_type == "full":
            path = self.broadcast(filepath)
            if is_sharded_checkpoint(path) and self.is_global_zero:
                shutil.rmtree(path)
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        if storage_options is not None:
            raise TypeError("PartiStrategy(state_dict_type='sharded') writes through torch.distributed.checkpoint:"
                            " storage_options are not supported; use state_dict_type='full' for a CheckpointIO.")
        path = str(self.broadcast(filepath))
        if "://" in path:
            raise NotImplementedError(
                f"sharded checkpoints are written to a local or mounted file system, not {path!r}: use"
                " PartiStrategy(state_dict_type='full') for a remote URL, or save to a mounted path."
            )
        plan = self.resolved_plan
        meta = {"parti": {"plan": plan.to_dict(), "world_size": self.world_size, "num_nodes": self.num_nodes}}
        save_sharded(path, checkpoint, meta)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        # Always tensors and plain containers only: a checkpoint is data, and unpickling arbitrary
        # objects would run whatever code a crafted file carries. parti's own checkpoints need nothing more.
        if weights_only is False:
            rank_zero_info("parti: checkpoints are always loaded as weights only; ignoring the request to unpickle.")
        path = Path(self.broadcast(checkpoint_path))
        self._restored_sharded = False
        if not path.is_dir():
            return super().load_checkpoint(path, weights_only=True)
        if not is_sharded_checkpoint(path):
            raise CheckpointError(
                f"{path} is a directory but not a complete parti checkpoint (no meta.pt or .metadata): it was"
                " not written by parti, or its save did not finish."
            )
        module = self.lightning_module
        assert module is not None and module._trainer is not None
        fitting = module._trainer.state.fn == TrainerFn.FITTING
        meta = load_sharded(path, module, self.optimizers if fitting else (), strict=module.strict_loading)
        parti = meta.pop("parti")
        if fitting:
            self._restore_rng(parti)
        self._restored_sharded = True
        if fitting and parti.get("optimizers") and "optimizer_states" not in meta:
            meta["optimizer_states"] = [None] * len(parti["optimizers"])  # restored above; Lightning checks the key
        return meta

    def _restore_rng(self, parti: Mapping[str, Any]) -> None:
        states = parti.get("rng", [])
        if not states:
            rank_zero_info("parti: the checkpoint holds no RNG states (converted from a file); RNGs left as seeded.")
            return
        if len(states) != self.world_size:
            rank_zero_info(
                f"parti: the checkpoint was written by {len(states)} processes, this run has {self.world_size}:"
                " random number generators continue from this run's seeds, not the checkpoint's."
            )
            return
        restore_rng_state(states[self.global_rank])

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # Sharded parameters and optimizers exist only after `setup`; loading then works for every plan.
        return True

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        assert self.lightning_module is not None
        if self._state_dict_type == "sharded":
            # What this rank holds, keyed by the module's own names; `save_checkpoint` writes the shards.
            return sharded_model_state(self.lightning_module)
        # Gathered and keyed by the module's own names under every plan: a plain Lightning state dict.
        if self._shards_module:
            return full_state_dict(self.lightning_module)
        return self.lightning_module.state_dict()

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        assert self.lightning_module is not None
        if self._restored_sharded:
            return  # `load_checkpoint` read the weights straight into the module
        if self._shards_module:
            load_full_state_dict(self.lightning_module, checkpoint["state_dict"], strict=strict)
        else:
            self.lightning_module.load_state_dict(checkpoint["state_dict"], strict=strict)

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        # Keyed by parameter name rather than position, so it loads under any other plan.
        assert self.lightning_module is not None
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's torch optimizer
        if self._state_dict_type == "sharded":
            return sharded_optimizer_state(self.lightning_module, optimizer)
        return full_optimizer_state_dict(self.lightning_module, optimizer)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        assert self.lightning_module is not None
        if self._restored_sharded:
            return
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            state = named_optimizer_state(state, self.lightning_module, optimizer)
            load_full_optimizer_state_dict(self.lightning_module, optimizer, state)

    # ------------------------------------------------------------------ collectives

    @override
    def reduce(
        self, tensor: Tensor | Any, group: Any | None = None, reduce_op: Any | None = "mean"
    ) -> Tensor | Any:
        if isinstance(tensor, Tensor):
            group = group or self._dp_group
            name = _logged_name(inspect.currentframe())
            if name is not None and _distributed_is_initialized():
                self._check_same_logged_name(name, group, tensor.device)
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    def _check_same_logged_name(self, name: str, group: Any, device: torch.device) -> None:
        """Fail on every rank, rather than hang or add unrelated values, when ranks sync different metrics.

        ``self.log(name, value, sync_dist=True)`` reduces values in the order each rank logs them, so
        ranks that log different names would pair unrelated values, or wait forever for a partner.
        One small all-reduce compares a hash of the names first (max of h and of -h: equal iff all agree).
        """
        digest = zlib.crc32(name.encode())
        pair = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
        dist.all_reduce(pair, op=dist.ReduceOp.MAX, group=group)
        if pair[0].item() != -pair[1].item():
            raise RuntimeError(
                f"rank {self.global_rank} logged {name!r} with sync_dist=True while another rank logged a different"
                " name at the same point: every rank must log the same metrics, in the same order, when they are"
                " synced (sync_dist=True). Log rank-specific values without sync_dist, or under the same name."
            )

    @override
    def all_gather(self, tensor: Tensor, group: Any | None = None, sync_grads: bool = False) -> Tensor:
        return _all_gather_ddp_if_available(tensor, group=group or self._dp_group, sync_grads=sync_grads)

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        # Over every process, not just the data-parallel group: a barrier synchronizes processes
        # (checkpoint writes, teardown), and model-parallel replicas must wait too.
        if not _distributed_is_initialized():
            return
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[self.root_device.index])
        else:
            dist.barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        # Over every process for the same reason as `barrier`: a broadcast value (a checkpoint path,
        # a decision) must reach model-parallel replicas as well.
        if not _distributed_is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    # ------------------------------------------------------------------ errors and teardown

    @override
    def on_exception(self, exception: BaseException) -> None:
        # Make sure the user learns which rank failed.
        print(
            f"[parti rank {self.global_rank}/{self.world_size}] {type(exception).__name__}: {exception}",
            file=sys.stderr,
            flush=True,
        )
        # The caller may catch it and go on in the same processes: the launcher ends the other ranks only
        # if this process goes away instead (see PartiSubprocessScriptLauncher).
        if isinstance(self._launcher, PartiSubprocessScriptLauncher):
            self._launcher.note_failure()

    @override
    def teardown(self) -> None:
        if self._grad_sync is not None:
            self._grad_sync.remove()
            self._grad_sync = None
        module = self.lightning_module
        if (
            module is not None
            and module._trainer is not None
            and module._trainer.state.fn == TrainerFn.FITTING
            and self._layer_sync is not None
        ):
            assert self.model is not None
            self.model = self._layer_sync.revert(self.model)
        super().teardown()
        restore_backend_interfaces()  # the run's groups exist; what the process does next is not pinned

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register("parti", cls, description="parti: partitioned training (plan='auto')")
        strategy_registry.register(
            "parti_spawn", cls, description="parti with start_method='spawn' (notebooks)", start_method="spawn"
        )
        for name in PRESETS:
            strategy_registry.register(f"parti_{name}", cls, description=f"parti with plan='{name}'", plan=name)


def _is_sharded(module: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def _positive_timedelta(name: str, value: float | timedelta) -> timedelta:
    result = value if isinstance(value, timedelta) else timedelta(seconds=float(value))
    if result.total_seconds() <= 0:
        raise ValueError(f"{name}={value!r} must be positive.")
    return result


def _logged_name(frame: FrameType | None) -> str | None:
    """The ``hook.name`` of the metric whose ``self.log(sync_dist=True)`` called ``reduce``, if that is the caller.

    Lightning's result collection calls ``strategy.reduce`` from a ``_ResultMetric`` method and passes
    no name; reading it off the calling frame costs a few attribute lookups per synced value.
    """
    for _ in range(3):
        frame = frame.f_back if frame is not None else None
        if frame is None:
            return None
        caller = frame.f_locals.get("self")
        meta = getattr(caller, "meta", None)
        if type(caller).__name__ == "_ResultMetric" and meta is not None:
            return f"{meta.fx}.{meta.name}"
    return None
