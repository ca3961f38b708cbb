#!/bin/sh
# Run the command in rank<N>/ under the launcher's rank, so that tests can
# see which ranks wrote files.
r=${HOROVOD_RANK:-${OMPI_COMM_WORLD_RANK:-${PMIX_RANK:-0}}}
mkdir -p "rank$r" && cd "rank$r" && exec "$@"
