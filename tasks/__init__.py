"""seqio task definitions. Importing this package registers them (see `ul2_tasks.pretrain`).

The folder is `tasks/`; the package is installed as `ul2_tasks`, so that a user's own
`tasks.py` (T5X's `MIXTURE_OR_TASK_MODULE='tasks'` convention) never shadows it.
"""

from ul2_tasks import pretrain  # noqa: F401  (registers the pretraining tasks)
from ul2_tasks import superglue  # noqa: F401  (registers superglue_* and the superglue mixture)
from ul2_tasks import generation  # noqa: F401  (registers gen_gutenberg_continuation)
