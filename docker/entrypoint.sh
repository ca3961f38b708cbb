#!/bin/sh
# With DPT_SSHD=1 the container also serves ssh, so that horovodrun in another
# container (docker/compose.yaml) can start ranks here. The key is shared
# through the mounted volume, made once by whichever container starts first.
set -e
if [ "${DPT_SSHD:-0}" = 1 ]; then
    mkdir -p /root/.ssh /keys /run/sshd
    flock /keys/.lock sh -c '[ -f /keys/id_ed25519 ] || ssh-keygen -q -t ed25519 -N "" -f /keys/id_ed25519'
    cp /keys/id_ed25519 /root/.ssh/id_ed25519
    cp /keys/id_ed25519.pub /root/.ssh/authorized_keys
    chmod 600 /root/.ssh/id_ed25519 /root/.ssh/authorized_keys
    printf 'Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n' \
        > /root/.ssh/config
    /usr/sbin/sshd
fi
exec "$@"
