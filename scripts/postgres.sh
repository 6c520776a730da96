#!/usr/bin/env bash
# A throwaway PostgreSQL server for tests and CI, with databases `optuna` and `mlflow`.
#
#   scripts/postgres.sh start DIR [PORT]  # init DIR if needed, start on PORT (default: stored, else a free one),
#                                         # print postgresql+psycopg://postgres@127.0.0.1:PORT/optuna
#   scripts/postgres.sh url DIR [DB]      # print the URL of database DB (default optuna) again
#   scripts/postgres.sh stop DIR          # fast shutdown; nothing to do if it is not running
#
# Superuser `postgres`, trust auth, listening on 127.0.0.1 only (and a unix socket in DIR, so it never clashes with
# a system server), fsync off: test data only. PostgreSQL refuses to run as root, so as root the server runs as the
# OS user $PG_OS_USER (default postgres, created if missing) and DIR is chowned to it. Binaries: $PG_BIN, else the
# directory of `initdb` on PATH (links resolved), else the newest /usr/lib/postgresql/*/bin; exit status 3 if none.
set -euo pipefail
die() { echo "postgres.sh: $1" >&2; exit "${2:-1}"; }
[ $# -ge 2 ] || die "usage: $0 start DIR [PORT] | url DIR [DB] | stop DIR"
cmd=$1 dir=$2
case $cmd in start | stop | url) ;; *) die "unknown command $cmd: use start, url or stop" ;; esac
url() {  # the stored URL, with database $1 (default optuna)
  [ -s "$dir/url" ] || die "no server was started in $dir"
  local u; u=$(cat "$dir/url"); echo "${u%/*}/${1:-optuna}"
}
[ "$cmd" = url ] && { url "${3:-}"; exit; }
[ "$cmd" = stop ] && ! [ -f "$dir/data/PG_VERSION" ] && { echo "no server in $dir"; exit 0; }

if [ -z "${PG_BIN:-}" ]; then
  if command -v initdb >/dev/null; then PG_BIN=$(dirname "$(readlink -f "$(command -v initdb)")")
  else PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1); fi
fi
[ -n "$PG_BIN" ] && [ -x "$PG_BIN/initdb" ] && [ -x "$PG_BIN/pg_ctl" ] ||
  die "no PostgreSQL server binaries (initdb, pg_ctl): install the postgresql package or set PG_BIN" 3

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
cd "$dir"  # the server user may not be able to read the caller's working directory
data=$dir/data
as_pg=()
if [ "$(id -u)" = 0 ]; then
  user=${PG_OS_USER:-postgres}
  id -u "$user" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$user" ||
    die "cannot create the OS user $user to run PostgreSQL as (it refuses to run as root)"
  chown "$user" "$dir"
  as_pg=(runuser -u "$user" --)
  "${as_pg[@]}" test -w "$dir" || die "user $user cannot write $dir: make its parent directories traversable (o+x)"
fi
pg_ctl() { "${as_pg[@]}" "$PG_BIN/pg_ctl" -D "$data" "$@"; }
running() { [ -f "$data/PG_VERSION" ] && pg_ctl status >/dev/null 2>&1; }

case $cmd in
  stop)
    if running; then pg_ctl -m fast -w stop >/dev/null && echo "stopped the server in $dir"
    else echo "no server running in $dir"; fi ;;
  start)
    if ! [ -f "$data/PG_VERSION" ]; then
      "${as_pg[@]}" "$PG_BIN/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --locale=C >"$dir/initdb.log" 2>&1 ||
        die "initdb failed, see $dir/initdb.log:$(echo; tail -n 20 "$dir/initdb.log")"
      printf "%s\n" "listen_addresses = '127.0.0.1'" "unix_socket_directories = '$dir'" \
        "fsync = off" "synchronous_commit = off" "full_page_writes = off" >>"$data/postgresql.conf"
    fi
    if running; then
      port=$(cat "$dir/port")
      [ -z "${3:-}" ] || [ "$3" = "$port" ] || die "already running in $dir on port $port, not $3"
    else
      port=${3:-$(cat "$dir/port" 2>/dev/null || python3 -c \
        'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
      echo "$port" >"$dir/port"
      pg_ctl -l "$dir/server.log" -o "-p $port" -w -t 60 start >/dev/null ||
        die "the server did not start, see $dir/server.log:$(echo; tail -n 20 "$dir/server.log")"
    fi
    for _ in $(seq 60); do "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$port" && break; sleep 0.5; done
    "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$port" || die "pg_isready: no answer on 127.0.0.1:$port"
    psql=("$PG_BIN/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA)
    for db in optuna mlflow; do
      [ -n "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = '$db'")" ] ||
        "${psql[@]}" -c "CREATE DATABASE $db" >/dev/null
    done
    echo "postgresql+psycopg://postgres@127.0.0.1:$port/optuna" >"$dir/url"
    url ;;
esac
