"""seqio task definitions. Importing this package registers them (see `tasks.pretrain`)."""

from tasks import pretrain  # noqa: F401  (registers the pretraining tasks)
