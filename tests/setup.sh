#!/usr/bin/env bash
# Everything the test suite needs on a fresh Debian machine, installed from this repo's own files, and the
# services it talks to started. Idempotent: a second run installs nothing and starts nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check -r requirements.txt

# Debian packages: Chromium for the browser tests, squid (its stock configuration) as the corporate proxy in front of
# it, RabbitMQ for the listener tests, PostgreSQL for the second store.
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ -x /usr/sbin/squid ] || need+=(squid)
command -v rabbitmq-server >/dev/null 2>&1 || need+=(rabbitmq-server)
command -v pg_ctlcluster >/dev/null 2>&1 || need+=(postgresql)
# systemd-analyze checks the units in .ci/run.
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "tests/setup.sh: missing Debian packages: ${need[*]} (run as root, or install them)" >&2
  fi
fi

# PostgreSQL on 127.0.0.1:5432 (trust auth, user postgres), started if it is not answering: tests make and drop
# databases of their own there.
pg_up() { (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; }
if ! pg_up && command -v pg_ctlcluster >/dev/null 2>&1; then
  for version in $(ls /etc/postgresql 2>/dev/null); do
    pg_ctlcluster --skip-systemctl-redirect "$version" main start >/dev/null 2>&1 || true
  done
  for _ in $(seq 1 30); do pg_up && break; sleep 1; done
fi

# RabbitMQ on 127.0.0.1:5672 (guest/guest), started if it is not answering.
amqp_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if ! amqp_up && command -v rabbitmq-server >/dev/null 2>&1; then
  rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 1 60); do amqp_up && break; sleep 1; done
  command -v rabbitmqctl >/dev/null 2>&1 && timeout 60 rabbitmqctl await_startup >/dev/null 2>&1 || true
fi
