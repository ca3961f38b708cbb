import sys

from trainer.quiet import install

install()  # before anything imports tensorflow

from trainer import interrupts  # noqa: E402

interrupts.install()  # SIGTERM/SIGINT end the process within seconds, even inside TensorFlow

from .cli import main  # noqa: E402

sys.exit(main())
