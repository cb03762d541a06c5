"""wm: decoder-free world models (R2-Dreamer, MuDreamer) and the DreamerV3 baseline, in Lightning.

Importing it quiets two lines Lightning prints at every start that are not the user's business: a
tip to install its cloud logger (wm logs to MLflow), and a deprecation warning torch raises about
Lightning's own code. Nothing heavy is imported here: env worker processes import the package too.
"""

import logging
import warnings


class _NoLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoLitLoggerTip())
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
