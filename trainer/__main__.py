import os
import sys

from .quiet import install

install()  # before anything imports tensorflow

from . import interrupts  # noqa: E402

interrupts.install()  # SIGTERM/SIGINT end the process within seconds, even inside TensorFlow

from .cli import main  # noqa: E402

code = main()
if code in (128 + 2, 128 + 15):
    # Stopped by a signal: the checkpoint is on disk; Horovod's and
    # TensorFlow's exit handlers could wait for peers that are gone.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
