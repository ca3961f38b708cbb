import sys

from .quiet import install

install()  # before anything imports tensorflow

from .cli import main  # noqa: E402

sys.exit(main())
