"""Training: Ray Data inputs, a Ray Train TorchTrainer (DDP) loop, evaluation and the model bundle.

Plain torch / numpy (usable without Ray): :mod:`~tessera.train.catalog` (item feature table),
:mod:`~tessera.train.examples` (time split, next-item examples), :mod:`~tessera.train.retrieval`
(two-tower model + loss), :mod:`~tessera.train.ranking` (ranker stage), :mod:`~tessera.train.evaluate`,
:mod:`~tessera.train.state` (checkpoint contents, the bundle rebuilt from them).
Ray wiring: :mod:`~tessera.train.datasets` (Ray Data), :mod:`~tessera.train.shared` (the user data and
item catalog built once a run, one copy a node in the object store), :mod:`~tessera.train.worker` (the
per-worker loop), :mod:`~tessera.train.job` (``run_training``: trainer, checkpoints on S3, bundle).

Nothing is imported here, so ``import tessera.train.config`` does not pull in Ray.
"""
