import os
import sys

# TensorFlow's C++ start-up chatter (CUDA plugin registration on a CPU-only
# machine) buries the progress bar; TF_CPP_MIN_LOG_LEVEL=0 brings it back.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from .cli import main  # noqa: E402

sys.exit(main())
