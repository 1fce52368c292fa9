"""PartiStrategy: the thin Lightning adapter around a partition plan.

It owns the process group and the named device mesh, applies the plan to the user's module (the
parallel math lives in ``parti_lightning.parallel``), and routes the collectives Lightning asks for
over the data-parallel group, so logged values and metrics are never over-counted by model-parallel
replicas.
"""

from __future__ import annotations

import logging
import sys
from contextlib import ExitStack, nullcontext
from datetime import timedelta
from typing import Any, Literal, Union

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from lightning_fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
from torch.distributed import ProcessGroup
from torch.optim import Optimizer
from typing_extensions import override

from parti_lightning.accelerator import PartiAccelerator, release_freed_memory
from parti_lightning.checkpoint.hooks import CheckpointHooks, StateDictType
from parti_lightning.lightning_adapters import prelaunch
from parti_lightning.lightning_adapters.autoplan import StepMeter, choose_in_run, rank_budget
from parti_lightning.lightning_adapters.collectives import Collectives
from parti_lightning.lightning_adapters.compat import check_callbacks
from parti_lightning.lightning_adapters.compiled import take_compiler
from parti_lightning.lightning_adapters.launchers import PartiMultiProcessingLauncher, PartiSubprocessScriptLauncher
from parti_lightning.lightning_adapters.layer_sync import PartiSyncBatchNorm
from parti_lightning.lightning_adapters.logging_sync import sync_metrics_over
from parti_lightning.lightning_adapters.network import init_dist_connection, restore_backend_interfaces, track_mesh
from parti_lightning.lightning_adapters.precision_clip import clip_by_model_norm
from parti_lightning.lightning_adapters.sample_step import SampleStep
from parti_lightning.lightning_adapters.step_routing import StepRouting
from parti_lightning.lightning_adapters.trunk_precheck import check_trunk_before_launch
from parti_lightning.mesh import MeshCoordinates, ParallelMesh
from parti_lightning.parallel import (
    Parallelized,
    check_module,
    holds_part_of_the_model,
    holds_sharded_tensors,
    parallelize,
    shards_module,
)
from parti_lightning.parallel.storage import retarget_lr_scheduler
from parti_lightning.plan import PRESETS, PartitionPlan, PlanLike, ResolvedPlan
from parti_lightning.planner import PlanReport

log = logging.getLogger(__name__)

StartMethod = Literal["popen", "spawn", "fork", "forkserver"]


class PartiStrategy(CheckpointHooks, Collectives, StepRouting):
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
            prediction does not see, beyond each plan's own margin. Default: none on CPU, 10% on CUDA.
        planner_calibration: under ``plan="auto"``, keep the measured over predicted step time and peak
            memory of the first steps in the hardware cache, and multiply later predictions on this
            machine by them (per kind of plan; see :mod:`parti_lightning.planner.calibration`). ``False``
            plans from the cost model alone and records nothing.
        state_dict_type: how checkpoints are written. ``"auto"``: ``"full"`` where one rank holds the
            whole model anyway (ddp, zero1), ``"sharded"`` where the parameters are sharded or split (zero2,
            zero3, hybrid, tensor, pipeline). ``"sharded"``: a directory written by every rank through
            ``torch.distributed.checkpoint`` (each rank writes what it holds; no rank gathers the model),
            atomically, loadable under any plan or world size; ``parti-lightning convert`` turns it into a
            single file. ``"full"``: one plain Lightning file gathered on rank 0. Either kind loads under any
            plan.
        resume: ``"auto"``: ``fit`` without ``ckpt_path`` resumes from the newest checkpoint in the run's
            ``ModelCheckpoint`` folder (a restarted job goes on by itself); ``"never"``: as Lightning.
        accelerator: the device partitions; default :class:`~parti_lightning.PartiAccelerator`.
        parallel_devices: devices of this node (normally set by the Trainer).
        cluster_environment: normally detected by the Trainer (torchrun, SLURM, ...).
        checkpoint_io: how checkpoints are written.
        precision_plugin: normally set by the Trainer from ``precision=``.
    """

    strategy_name = "parti"
    compiles_blocks = True  # `trainer.fit(torch.compile(model))`: each block compiled after partitioning

    def __init__(
        self,
        plan: PlanLike = "auto",
        process_group_backend: Literal["gloo", "nccl"] | None = None,
        timeout: Union[float, timedelta] = 600.0,
        startup_timeout: Union[float, timedelta] = 1800.0,
        start_method: StartMethod = "popen",
        state_dict_type: StateDictType = "auto",
        resume: Literal["never", "auto"] = "never",
        memory_budget: int | None = None,
        planner_headroom: float | None = None,
        planner_calibration: bool = True,
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
        self._auto = prelaunch.is_auto(plan)
        self.plan = PartitionPlan.from_value(plan)
        self.plan.check_implemented()
        prelaunch.check_arguments(memory_budget, planner_headroom, process_group_backend, state_dict_type, resume)
        self.resume = resume
        self._memory_budget = memory_budget
        self._planner_headroom = planner_headroom
        self._planner_calibration = planner_calibration
        self.plan_report: PlanReport | None = None  # the planner's choice and reasons (global rank 0, plan="auto")
        self._step_meter: StepMeter | None = None
        self._process_group_backend = process_group_backend
        self._timeout = prelaunch.positive_timedelta("timeout", timeout)
        self._startup_timeout = prelaunch.positive_timedelta("startup_timeout", startup_timeout)
        self._start_method = start_method
        self._requested_state_dict_type = state_dict_type
        self._restored_sharded = False  # the last `load_checkpoint` already restored model and optimizers
        self._num_nodes = 1
        self.mesh: ParallelMesh | None = None
        self._parallel: Parallelized | None = None  # the plan as applied to the module (fit only)
        self._backward_context = ExitStack()
        # Read every step (sampler, backward sync): resolved once, again only if the world changes.
        self._resolved: tuple[tuple[int, int], ResolvedPlan] | None = None

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
    def plans_automatically(self) -> bool:
        """Whether the planner chooses the plan (``plan="auto"``) when ``fit`` sets up."""
        return self._auto

    @property
    def memory_budget(self) -> int | None:
        """The per-rank budget ``plan="auto"`` plans for; ``None``: the device's."""
        return self._memory_budget

    @property
    def planner_headroom(self) -> float | None:
        return self._planner_headroom

    @property
    def planner_calibration(self) -> bool:
        return self._planner_calibration

    @property
    def resolved_plan(self) -> ResolvedPlan:
        """The plan with its degrees fixed for this world size (resolved once per world shape)."""
        shape = (self.num_nodes * self.num_processes, self.num_processes)
        if self._resolved is None or self._resolved[0] != shape:
            self._resolved = (shape, self.plan.resolve(shape[0], ranks_per_node=shape[1]))
        return self._resolved[1]

    @property
    def data_parallel_rank(self) -> int:
        # Ranks that differ only in their tensor or pipeline coordinate share a data-parallel rank.
        if self.mesh is not None:
            return self.mesh.data_parallel_rank
        return MeshCoordinates.of(self.global_rank, self.resolved_plan).data_parallel_rank

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
        device_type = self.parallel_devices[0].type if self.parallel_devices else "cpu"
        if isinstance(self.accelerator, PartiAccelerator):
            self.accelerator.check_devices(self.num_processes)
        prelaunch.check_backend(device_type, self.process_group_backend)
        prelaunch.check_plan(self.resolved_plan, device_type)
        assert self.cluster_environment is not None
        if self._start_method == "popen":
            self._launcher = PartiSubprocessScriptLauncher(
                self.cluster_environment, self.num_processes, self.num_nodes, before_launch=self._validate_model
            )
        else:
            self._launcher = PartiMultiProcessingLauncher(
                self, start_method=self._start_method, before_launch=self._validate_model
            )

    def _validate_model(self, trainer: Trainer | None = None, args: tuple[Any, ...] = ()) -> None:
        """Checks that need the user's module, run by the launcher before it starts any process."""
        module = self.lightning_module
        if module is not None:
            plan = self.resolved_plan
            check_callbacks(trainer.callbacks if trainer is not None else [], plan)
            check_module(module, plan, automatic_optimization=module.automatic_optimization)
            fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
            if fitting and plan.pipeline > 1 and not holds_part_of_the_model(module):
                rank_zero_info(f"parti: pipeline trunk contract {check_trunk_before_launch(module, args)}")

    # ------------------------------------------------------------------ process group and mesh

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        if isinstance(self.accelerator, PartiAccelerator):
            partition = self.accelerator.setup_partition(
                self.root_device, self.local_rank, self.num_processes, sharded=shards_module(self.resolved_plan)
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

    def _build_mesh(self, plan: ResolvedPlan) -> None:
        self.mesh = ParallelMesh(plan, self.root_device.type)
        track_mesh(self.mesh.device_mesh)
        # Every rank has joined: from now on a collective waits `timeout`, not `startup_timeout`.
        dist.barrier()
        self.mesh.set_timeout(self._timeout)

    @property
    def data_parallel_group(self) -> ProcessGroup | None:
        """The group over which batches differ: Lightning's reductions and the sampler use it."""
        return self.mesh.data_parallel_group if self.mesh is not None else None

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
            use_torch = self.process_group_backend == "nccl"
            self._layer_sync = PartiSyncBatchNorm(self.data_parallel_group, use_torch=use_torch)
            self.model = self._layer_sync.apply(self.model)
        if self.mesh is not None and (self.mesh.tensor_enabled or self.mesh.pipeline_enabled):
            sync_metrics_over(self.model, self.data_parallel_group)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if not holds_sharded_tensors(self.model) and not holds_part_of_the_model(self.model):
            # Every replica starts from rank 0's weights, whatever each process initialized. (A module
            # still split by an earlier `fit` is consistent already: its parts are its state.)
            _sync_module_states(self.model)
        compiler = take_compiler(self.lightning_module, fitting)  # compiled per block, after partitioning
        if fitting:
            self._apply_plan(trainer, compiler)
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _apply_plan(self, trainer: Trainer, compiler: Any) -> None:
        assert self.mesh is not None and self.lightning_module is not None
        module = self.lightning_module
        sample = None
        if self.mesh.tensor_enabled or self.mesh.pipeline_enabled:
            sample = SampleStep(trainer, module, self.root_device)
        self._parallel = parallelize(
            self.model, self.mesh, automatic_optimization=module.automatic_optimization, run_example=sample,
            batch_size=sample.batch_size if sample is not None else None, compiler=compiler,
        )
        for line in self._parallel.describe():
            rank_zero_info(f"parti: {line}")
        if self.mesh.tensor_enabled or self.mesh.pipeline_enabled:
            clip_by_model_norm(self.precision_plugin, self._parallel.clip_grad_norm_)

    def _choose_plan(self, trainer: Trainer) -> None:
        """``plan="auto"``: the planner chooses on global rank 0, every rank takes its choice."""
        assert self.lightning_module is not None and self.mesh is not None
        chosen, report, self._step_meter = choose_in_run(
            trainer, self.lightning_module, self.mesh, self.root_device,
            budget=rank_budget(self._memory_budget, self.accelerator),
            ranks_per_node=self.num_processes, headroom=self._planner_headroom,
            calibration=self._planner_calibration, startup_timeout=self._startup_timeout, timeout=self._timeout,
        )
        self.plan_report = report
        previous = self.resolved_plan
        self.plan, self._resolved = chosen, None
        if self.resolved_plan.mesh_shape != previous.mesh_shape:
            self._build_mesh(self.resolved_plan)
        if shards_module(self.resolved_plan) and self.root_device.type == "cpu":
            release_freed_memory()  # as the accelerator does for a sharded plan known at launch

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        with self._parallel.step_context() if self._parallel is not None else nullcontext():
            output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self._step_meter is not None and optimizer is self.optimizers[0]:
            self._step_meter.step()
        return output

    @override
    def setup_optimizers(self, trainer: Trainer) -> None:
        super().setup_optimizers(trainer)
        if self._parallel is None:
            return
        wrapped = []
        for optimizer in self.optimizers:
            replacement = self._parallel.wrap_optimizer(optimizer)
            if replacement is not optimizer:
                for config in self.lr_scheduler_configs:
                    if getattr(config.scheduler, "optimizer", None) is optimizer:
                        retarget_lr_scheduler(config.scheduler, replacement)
            wrapped.append(replacement)
        self.optimizers = wrapped

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    # ------------------------------------------------------------------ errors and teardown

    @override
    def on_exception(self, exception: BaseException) -> None:
        self._leave_backward_context()  # a backward that raised: the caller may go on in this process
        # Make sure the user learns which rank failed.
        print(f"[parti rank {self.global_rank}/{self.world_size}] {type(exception).__name__}: {exception}",
              file=sys.stderr, flush=True)
        # The caller may catch it and go on in the same processes: the launcher ends the other ranks only
        # if this process goes away instead (see PartiSubprocessScriptLauncher).
        if isinstance(self._launcher, PartiSubprocessScriptLauncher):
            self._launcher.note_failure()

    @override
    def teardown(self) -> None:
        if self._parallel is not None:
            self._parallel.remove()
            self._parallel = None
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
