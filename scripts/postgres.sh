#!/usr/bin/env bash
# A throw-away local PostgreSQL server from Debian's packages, for the tests and for trying
# several tune workers on one machine.
#
#   bash scripts/postgres.sh install            # apt-get install postgresql (as root; no-op if present)
#   bash scripts/postgres.sh start DIR [PORT]   # initdb DIR once, start on 127.0.0.1:PORT (default: a free
#                                               # port), create database lit_sahs; prints the URL last
#   bash scripts/postgres.sh stop DIR           # stop the server of DIR (data stays in DIR)
#
# The server listens on 127.0.0.1 only, keeps its socket in DIR, and runs as the `postgres`
# user when started by root (PostgreSQL refuses to run as root). User `lit_sahs`, password
# from DIR/password. `start` installs the packages first when they are missing and it may
# (root with apt-get); set LIT_SAHS_PG_INSTALL=0 to forbid that.
set -euo pipefail

die() { echo "postgres.sh: $*" >&2; exit 1; }

pg_bindir() {
  if [ -n "${PG_BIN:-}" ] && [ -x "$PG_BIN/initdb" ]; then echo "$PG_BIN"; return 0; fi
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; return 0; fi
  if command -v initdb >/dev/null 2>&1; then dirname "$(command -v initdb)"; return 0; fi
  return 1
}

install_pg() {
  if pg_bindir >/dev/null; then echo "postgresql server binaries: $(pg_bindir)"; return 0; fi
  [ "$(id -u)" = 0 ] || die "PostgreSQL is not installed and installing it needs root: sudo apt-get install postgresql"
  command -v apt-get >/dev/null 2>&1 || die "PostgreSQL is not installed and this system has no apt-get: install a PostgreSQL server and set PG_BIN"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends postgresql >/dev/null
  pg_bindir >/dev/null || die "apt-get installed postgresql but no initdb was found under /usr/lib/postgresql"
  echo "postgresql server binaries: $(pg_bindir)"
}

# run a command as the server's owner: root hands over to `postgres`, anyone else runs it directly
as_owner() {
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || die "root cannot run PostgreSQL and there is no 'postgres' user"
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start_pg() {
  local dir=${1:?usage: postgres.sh start DIR [PORT]} port=${2:-}
  if ! pg_bindir >/dev/null; then
    if [ "${LIT_SAHS_PG_INSTALL:-1}" != 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      install_pg >&2
    else
      die "no PostgreSQL server binaries (initdb) found: run 'bash scripts/postgres.sh install' as root or set PG_BIN"
    fi
  fi
  local bin; bin=$(pg_bindir)
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  [ "$(id -u)" = 0 ] && chown postgres "$dir"
  chmod 700 "$dir"
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    python3 -c "import secrets; print(secrets.token_hex(12))" > "$dir/password"
    chmod 600 "$dir/password"
    [ "$(id -u)" = 0 ] && chown postgres "$dir/password"
    as_owner "$bin/initdb" -D "$dir/data" -U lit_sahs --pwfile="$dir/password" --auth=scram-sha-256 \
      -E UTF8 --locale=C >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
  fi
  if as_owner "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
    port=$(cat "$dir/port")
  else
    port=${port:-$(free_port)}
    echo "$port" > "$dir/port"
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c max_connections=200" start >/dev/null \
      || { tail -n 20 "$dir/server.log" >&2 || true; die "the server did not start (log: $dir/server.log)"; }
  fi
  local pw; pw=$(cat "$dir/password")
  if ! PGPASSWORD=$pw "$bin/psql" -h 127.0.0.1 -p "$port" -U lit_sahs -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname='lit_sahs'" | grep -q 1; then
    PGPASSWORD=$pw "$bin/createdb" -h 127.0.0.1 -p "$port" -U lit_sahs lit_sahs
  fi
  echo "postgresql://lit_sahs:$pw@127.0.0.1:$port/lit_sahs"
}

stop_pg() {
  local dir=${1:?usage: postgres.sh stop DIR}
  [ -f "$dir/data/PG_VERSION" ] || return 0
  local bin; bin=$(pg_bindir) || return 0
  as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
}

case "${1:-}" in
  install) install_pg ;;
  start) shift; start_pg "$@" ;;
  stop) shift; stop_pg "$@" ;;
  *) echo "usage: bash scripts/postgres.sh install | start DIR [PORT] | stop DIR" >&2; exit 2 ;;
esac
