"""An adapter whose import dies in every process but the first to import it ($FLAKY_IMPORT_LOCK names the
lock file): a lone target's second worker, importing beside the first, dies while importing."""

import os
import time

from attnspec.adapters.torch import SDPAMHA

try:
    os.close(os.open(os.environ["FLAKY_IMPORT_LOCK"], os.O_CREAT | os.O_EXCL))
    time.sleep(1.0)  # the first importer is the slower one
except FileExistsError:
    os._exit(3)


class Target(SDPAMHA):
    pass
