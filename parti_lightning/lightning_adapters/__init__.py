"""The Lightning side of :class:`~parti_lightning.PartiStrategy`: adapters from Lightning's hooks to parti.

``parti_lightning.parallel`` and ``parti_lightning.planner`` never import Lightning; the files here are
where Lightning's strategy, launcher, plugin and callback interfaces meet them. The checkpoint hooks
are in :mod:`parti_lightning.checkpoint.hooks`, beside the format they write.

- ``auto_resume.py``: ``resume="auto"``: ``fit`` without ``ckpt_path`` goes on from the run's newest checkpoint.
- ``autoplan.py``: ``plan="auto"`` inside a run: an example batch from what the Trainer trains on, the
  choice made on rank 0 and sent to every rank, the measured step logged beside the prediction.
- ``collectives.py``: the collectives Lightning asks a strategy for (reduce, all-gather over the
  data-parallel group; barrier and broadcast over every process).
- ``compat.py``: Lightning features that cannot work under a plan, refused with the reason before the run.
- ``launchers.py``: Lightning's process launchers, with parti's last checks before any process starts.
- ``layer_sync.py``: ``sync_batchnorm=True``: Lightning's ``LayerSync`` over the data-parallel group.
- ``logging_sync.py``: ``self.log(sync_dist=True)`` and torchmetrics: every rank syncs the same metric,
  over the data-parallel ranks only.
- ``network.py``: where a run's sockets listen: a single-node run listens on loopback only.
- ``precision_clip.py``: ``gradient_clip_val`` by the whole model's norm under model parallelism.
- ``prelaunch.py``: the strategy's checks in the launching process (arguments, device and backend, plan).
- ``sample_step.py``: one real ``training_step`` on one batch, for techniques that check themselves first.
- ``step_routing.py``: where Lightning's step and backward hooks go (through FSDP's root when sharded).
- ``trunk_precheck.py``: the pipeline trunk's contract, checked on a meta copy before any rank starts.

Named ``lightning_adapters`` rather than ``lightning``: a script run by path from inside the package
(``python parti_lightning/cli.py``) puts ``parti_lightning/`` first on ``sys.path``, where a folder named
``lightning`` would hide the real Lightning package.
"""
