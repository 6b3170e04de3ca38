"""seqio task definitions. Importing this package registers them (see `tasks.pretrain`)."""

from tasks import pretrain  # noqa: F401  (registers the pretraining tasks)
from tasks import superglue  # noqa: F401  (registers superglue_* and the superglue mixture)
